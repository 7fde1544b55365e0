#!/usr/bin/env python3
"""PNG fixtures of every bit depth and colour type (tests/fixtures/png/),
written with pypng (which writes them all), and what Pillow's
`Image.open(f).convert("RGB")` makes of each, saved as a plain 8-bit RGB PNG
(`FILE.rgb.png`): what tests check inferd's decoder against, value for value.

    python3 -m venv /tmp/pil && /tmp/pil/bin/pip install pillow==12.0.0 pypng==0.20220715.0
    /tmp/pil/bin/python scripts/make_png_fixtures.py

Gray 1/2/4/8/16-bit, gray+alpha 8/16, RGB 8/16, RGBA 8/16, palette 1/2/4/8
(with and without a tRNS chunk), gray and RGB with a tRNS colour key; 13×7
pixels (odd rows of packed low-depth samples). One exception to Pillow:
16-bit gray, which Pillow opens as 32-bit integers and `convert("RGB")`
clips to 255 (every value over 255 turns white); the PNG standard scales a
sample to 8 bits, here by keeping its high byte as Pillow does for 16-bit RGB,
and that is what its `.rgb.png` holds (docs/api.md "Images").
Byte-identical output from run to run.
"""
from pathlib import Path

import png
from PIL import Image

OUT = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "png"
W, H = 13, 7


def sample(x, y, c, depth):
    top = (1 << depth) - 1
    return ((x * 37 + y * 71 + c * 113 + (x * y) * 7) * 2749) % (top + 1)


def rows(channels, depth):
    return [[sample(x, y, c, depth) for x in range(W) for c in range(channels)] for y in range(H)]


def write(name, rows_, **kw):
    with open(OUT / name, "wb") as f:
        png.Writer(W, H, **kw).write(f, rows_)


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    made = []
    for depth in (1, 2, 4, 8, 16):
        made.append((f"gray{depth}.png", rows(1, depth), dict(greyscale=True, bitdepth=depth)))
    made.append(("gray8-trns.png", rows(1, 8), dict(greyscale=True, bitdepth=8, transparent=37)))
    for depth in (8, 16):
        made.append((f"graya{depth}.png", rows(2, depth), dict(greyscale=True, alpha=True, bitdepth=depth)))
        made.append((f"rgb{depth}.png", rows(3, depth), dict(greyscale=False, bitdepth=depth)))
        made.append((f"rgba{depth}.png", rows(4, depth), dict(greyscale=False, alpha=True, bitdepth=depth)))
    made.append(("rgb8-trns.png", rows(3, 8), dict(greyscale=False, bitdepth=8, transparent=(0, 71, 226))))
    for depth in (1, 2, 4, 8):
        n = 1 << depth
        palette = [((i * 53) % 256, (i * 97 + 11) % 256, (255 - i * 29) % 256) for i in range(n)]
        made.append((f"palette{depth}.png", rows(1, depth), dict(palette=palette, bitdepth=depth)))
        with_alpha = [p + ((i * 67) % 256,) for i, p in enumerate(palette)]
        made.append((f"palette{depth}-trns.png", rows(1, depth), dict(palette=with_alpha, bitdepth=depth)))
    for name, data, kw in made:
        write(name, data, **kw)
        with Image.open(OUT / name) as im:
            if name == "gray16.png":
                # Pillow clips 16-bit gray to 255; the standard scales it: the high byte.
                hi = [v >> 8 for row in data for v in row]
                rgb = Image.frombytes("RGB", (W, H), bytes(v for v in hi for _ in range(3)))
            else:
                rgb = im.convert("RGB")
            rgb.save(OUT / f"{name[:-4]}.rgb.png")
    print(f"wrote {len(made)} PNGs to {OUT}")


if __name__ == "__main__":
    main()
