#!/usr/bin/env python3
"""EXIF orientation fixtures (tests/fixtures/orientation/), made with Pillow:
one 24×16 picture stored under each of the 8 orientation tags, as PNG (eXIf
chunk) and as JPEG (APP1), and what Pillow's `ImageOps.exif_transpose(...)
.convert("RGB")` makes of each, saved as a plain PNG (`upright-N.png`, no tag).

    python3 -m venv /tmp/pil && /tmp/pil/bin/pip install pillow==12.0.0
    /tmp/pil/bin/pip install scikit-image==0.26.0    # the phone photo
    /tmp/pil/bin/python scripts/make_orientation_fixtures.py

The stored pixels are the picture turned by the inverse of the tag, so every
upright result is the same picture (a camera writes the sensor's pixels and
the tag that turns them upright). Also `portrait-tag-6.png` and
`cafe-tag-6.png`: the VLM fixture's portrait.png and the OCR receipt stored as
a phone held sideways writes them (turned, tag 6), which must give the same
answers as the upright files (tokens; lines and polygons). Byte-identical output
from run to run.
"""
from pathlib import Path

from PIL import Image, ImageOps

OUT = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "orientation"
# What turns the upright picture into the stored pixels for each tag (the inverse of the tag's transform).
STORE = {
    1: [],
    2: [Image.Transpose.FLIP_LEFT_RIGHT],
    3: [Image.Transpose.ROTATE_180],
    4: [Image.Transpose.FLIP_TOP_BOTTOM],
    5: [Image.Transpose.TRANSPOSE],
    6: [Image.Transpose.ROTATE_90],
    7: [Image.Transpose.TRANSVERSE],
    8: [Image.Transpose.ROTATE_270],
}


def picture():
    """24×16, smooth (so JPEG keeps it close) and no symmetry (so every turn shows)."""
    im = Image.new("RGB", (24, 16))
    for y in range(16):
        for x in range(24):
            im.putpixel((x, y), (10 * x, 15 * y, 120 + 4 * x - 3 * y))
    return im


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    upright = picture()
    for tag, ops in STORE.items():
        stored = upright
        for op in ops:
            stored = stored.transpose(op)
        exif = Image.Exif()
        exif[0x0112] = tag
        stored.save(OUT / f"tag-{tag}.png", exif=exif.tobytes())
        stored.save(OUT / f"tag-{tag}.jpg", quality=95, subsampling=0, exif=exif.tobytes())
        for ext in ("png", "jpg"):
            with Image.open(OUT / f"tag-{tag}.{ext}") as im:
                turned = ImageOps.exif_transpose(im).convert("RGB")
                assert turned.size == upright.size, (tag, ext, turned.size)
                if ext == "png":
                    assert turned.tobytes() == upright.tobytes(), f"tag {tag}: Pillow does not turn it back upright"
                turned.save(OUT / f"upright-{tag}.{ext}.png")
    for source, name in ((OUT.parent / "vlm" / "images" / "portrait.png", "portrait-tag-6.png"),
                         (OUT.parent / "ocr" / "cafe.png", "cafe-tag-6.png")):
        upright_photo = Image.open(source).convert("RGB")
        exif = Image.Exif()
        exif[0x0112] = 6
        upright_photo.transpose(Image.Transpose.ROTATE_90).save(OUT / name, exif=exif.tobytes())
        with Image.open(OUT / name) as im:
            assert ImageOps.exif_transpose(im).convert("RGB").tobytes() == upright_photo.tobytes()
    phone_photo()
    print(f"wrote {OUT}")


def phone_photo():
    """`phone-tag-6.jpg`: a portrait photo (a 192×256 piece of the JPEG corpus's astronaut photo)
    as a phone held upright writes it: the sensor's landscape pixels, 4:2:0, tag 6; and
    `phone-upright.png`, what transformers' `load_image` reads from it (Pillow's decode, turned
    upright). Classification, boxes and VLM tokens of the two must be the same."""
    from skimage import data

    upright = Image.fromarray(data.astronaut()).crop((150, 40, 342, 296))
    exif = Image.Exif()
    exif[0x0112] = 6
    upright.transpose(Image.Transpose.ROTATE_90).save(
        OUT / "phone-tag-6.jpg", quality=90, subsampling=2, exif=exif.tobytes()
    )
    with Image.open(OUT / "phone-tag-6.jpg") as im:
        read = ImageOps.exif_transpose(im).convert("RGB")
    assert read.size == (192, 256), read.size
    read.save(OUT / "phone-upright.png")


if __name__ == "__main__":
    main()
