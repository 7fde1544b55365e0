#!/usr/bin/env python3
"""Render the OCR test images and record what the reference OCR answers.

Two steps, each committed (all files are small):

1. `render` draws text images into tests/fixtures/ocr/: one line, several
   fonts and sizes, a synthetic receipt (and a second one with another
   layout), upside-down and skewed lines, a wide strip, a large page, a
   JPEG, and an image with no text. Needs Pillow and the DejaVu fonts
   (Debian: fonts-dejavu-core).

2. `reference` runs RapidOCR itself on every image and writes
   expected-<variant>.json. The two OCR variants inferd ships come from two
   packages that cannot share a virtual environment (they pull different
   OpenCV wheels), so run it once in each:

    python3 -m venv /tmp/ocr4 && /tmp/ocr4/bin/pip install rapidocr_onnxruntime==1.4.4 pillow==13.0.0
    python3 -m venv /tmp/ocr6 && /tmp/ocr6/bin/pip install rapidocr==3.10.0 onnxruntime==1.31.1 pillow==13.0.0
    /tmp/ocr4/bin/python scripts/make_ocr_fixtures.py render
    /tmp/ocr4/bin/python scripts/make_ocr_fixtures.py reference   # → expected-v4.json (PP-OCRv4)
    /tmp/ocr6/bin/python scripts/make_ocr_fixtures.py reference   # → expected-v6-small.json (PP-OCRv6 small)

Both references run with their package defaults, which are inferd's
defaults for the `ocr` model (same detector limits, thresholds, angle
classifier and text score).
"""
import json
import sys
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "fixtures" / "ocr"
FONTS = Path("/usr/share/fonts/truetype/dejavu")


def font(name, size):
    return ImageFont.truetype(str(FONTS / f"{name}.ttf"), size)


def page(w, h, lines, bg="white"):
    """An image with `lines` of (x, y, text, font, colour) drawn on `bg`."""
    img = Image.new("RGB", (w, h), bg)
    d = ImageDraw.Draw(img)
    for x, y, text, f, colour in lines:
        d.text((x, y), text, font=f, fill=colour)
    return img


def receipt():
    """A till receipt: store, address, date, items with right-aligned prices, total."""
    sans, bold, mono = font("DejaVuSans", 22), font("DejaVuSans-Bold", 30), font("DejaVuSansMono", 22)
    rows = [
        (130, 30, "FRESH MARKET", bold, "black"),
        (95, 80, "12 Harbour Street, Bristol", sans, "black"),
        (40, 130, "Date: 2026-03-14  10:42", sans, "black"),
        (40, 165, "Receipt no. 004817", sans, "black"),
    ]
    items = [("Milk 1L", "1.29"), ("Sourdough bread", "3.10"), ("Apples 1kg", "2.45"), ("Coffee beans", "8.99")]
    y = 220
    for name, price in items:
        rows.append((40, y, name, mono, "black"))
        rows.append((380, y, price, mono, "black"))
        y += 40
    rows.append((40, y + 20, "TOTAL", bold, "black"))
    rows.append((360, y + 20, "15.83", bold, "black"))
    rows.append((40, y + 80, "Paid by card  EUR", sans, "black"))
    rows.append((120, y + 130, "Thank you!", sans, "black"))
    img = page(480, y + 190, rows)
    d = ImageDraw.Draw(img)
    d.line((40, 205, 440, 205), fill="black", width=2)
    d.line((40, y + 5, 440, y + 5), fill="black", width=2)
    return img


def cafe_receipt():
    """A second layout: day-first date, prices with a currency sign, total on the left of its amount."""
    sans, bold = font("DejaVuSans", 24), font("DejaVuSerif-Bold", 32)
    rows = [
        (150, 30, "Cafe Lumiere", bold, "black"),
        (60, 90, "Rue des Fleurs 8, Lyon", sans, "black"),
        (60, 135, "03/11/2026 08:15", sans, "black"),
        (60, 200, "2 x Espresso", sans, "black"),
        (380, 200, "5.00", sans, "black"),
        (60, 245, "Croissant", sans, "black"),
        (380, 245, "2.40", sans, "black"),
        (60, 310, "Total EUR", bold, "black"),
        (365, 310, "7.40", bold, "black"),
    ]
    return page(520, 380, rows)


def render():
    OUT.mkdir(parents=True, exist_ok=True)
    sans = font("DejaVuSans", 28)
    images = {
        "line.png": page(420, 80, [(20, 20, "Edge inferd 2026", sans, "black")]),
        "fonts.png": page(
            760,
            430,
            [
                (30, 20, "Sensor 7 reported 21.5 C at 08:15", font("DejaVuSans", 18), "black"),
                (30, 70, "Quarterly maintenance report", font("DejaVuSerif", 26), "black"),
                (30, 130, "ID: CAM-0042 / zone B", font("DejaVuSansMono", 22), "black"),
                (30, 185, "WARNING", font("DejaVuSans-Bold", 44), (170, 20, 20)),
                (30, 260, "Slanted words read too", font("DejaVuSerif-Italic", 30), "black"),
                (30, 330, "Pillow default font", ImageFont.load_default(size=24), (20, 20, 110)),
                (420, 380, "small print 12345", font("DejaVuSansCondensed", 16), "black"),
            ],
        ),
        "receipt.png": receipt(),
        "cafe.png": cafe_receipt(),
        "upside-down.png": page(520, 90, [(20, 20, "Rotated label 180", font("DejaVuSans", 34), "black")]).rotate(180),
        "skewed.png": page(560, 200, [(60, 80, "Skewed shipping label", font("DejaVuSans", 30), "black")]).rotate(
            7, resample=Image.BICUBIC, fillcolor="white"
        ),
        "strip.png": page(1400, 36, [(10, 4, "A long narrow banner of text in one line", font("DejaVuSans", 22), "black")]),
        "large.png": page(
            2600,
            1100,
            [
                (100, 150, "A large page is scaled down first", font("DejaVuSans", 80), "black"),
                (100, 500, "second line on the large page", font("DejaVuSerif", 70), "black"),
                (1500, 850, "corner 99", font("DejaVuSans-Bold", 64), "black"),
            ],
        ),
        "blank.png": Image.linear_gradient("L").resize((320, 240)).point(lambda v: 200 + v // 5).convert("RGB"),
    }
    for name, img in images.items():
        img.save(OUT / name, optimize=True)
    # A JPEG of a light-on-dark line (decoders may differ by a grey level or two).
    page(480, 90, [(24, 22, "Night mode 23:59", font("DejaVuSans-Bold", 32), (235, 235, 235))], bg=(25, 30, 40)).save(
        OUT / "dark.jpg", quality=92
    )
    print(f"rendered {len(images) + 1} images into {OUT}")


def reference():
    try:
        from rapidocr_onnxruntime import RapidOCR  # 1.4.x: PP-OCRv4

        engine, variant, package = RapidOCR(), "v4", "rapidocr_onnxruntime==1.4.4"

        def run(path):
            result, _ = engine(str(path))
            return [(box, text, score) for box, text, score in (result or [])]

    except ImportError:
        from rapidocr import RapidOCR  # 3.x: PP-OCRv6 small by default

        engine, variant, package = RapidOCR(params={"Global.log_level": "error"}), "v6-small", "rapidocr==3.10.0"

        def run(path):
            out = engine(str(path))
            if out.boxes is None:
                return []
            return list(zip(out.boxes.tolist(), out.txts, out.scores))

    cases = {}
    for path in sorted(OUT.glob("*.*")):
        if path.suffix not in (".png", ".jpg"):
            continue
        cases[path.name] = [
            {"text": text, "score": round(float(score), 5), "box": [[float(x), float(y)] for x, y in box]}
            for box, text, score in run(path)
        ]
    out = {"reference": package, "variant": variant, "cases": cases}
    (OUT / f"expected-{variant}.json").write_text(json.dumps(out, indent=1, ensure_ascii=False) + "\n")
    for name, lines in cases.items():
        print(f"{variant} {name}: {[line['text'] for line in lines]}")


if __name__ == "__main__":
    {"render": render, "reference": reference}[sys.argv[1] if len(sys.argv) > 1 else "render"]()
