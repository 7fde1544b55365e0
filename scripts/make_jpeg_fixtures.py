#!/usr/bin/env python3
"""JPEG corpus (tests/fixtures/jpeg/): files written by Pillow, by libjpeg's own
`cjpeg` and by TurboJPEG (simplejpeg), each beside what Pillow's
`Image.open(f).convert("RGB")` makes of it, saved as a plain PNG
(`NAME.rgb.png`), or, for a file Pillow refuses, the refusal in
`manifest.json`. inferd must read every file to the same values (0 differ)
and refuse the same files (src/pipeline/image.rs's corpus test).

    python3 -m venv /tmp/pil
    /tmp/pil/bin/pip install pillow==12.0.0 opencv-python-headless==5.1.0.95 \\
        simplejpeg==1.9.0 scikit-image==0.26.0 numpy
    apt-get install libjpeg-turbo-progs        # cjpeg
    /tmp/pil/bin/python scripts/make_jpeg_fixtures.py

The picture is a crop of scikit-image's `astronaut` (a NASA photograph that
ships in the package), so the DCT sees a real photo's edges and textures.
The corpus covers: baseline and progressive; 4:4:4, 4:2:2, 4:2:0, 4:4:0 and
4:1:1; grayscale; RGB without the YCbCr transform; CMYK (Pillow, Adobe
inverted) and YCCK (TurboJPEG); arithmetic coding; restart markers; odd
sizes from 1×1 to 4097 pixels; an ICC profile; truncated and corrupt files.

`manifest.json` also records, for each file Pillow reads, whether OpenCV's
`imread` (rapidocr's reader) gives the same pixels: it does for every
YCbCr, RGB and grayscale file (the same libjpeg-turbo, same settings); for
CMYK it converts differently (OpenCV's own formula).
"""
import io
import json
import subprocess
import tempfile
from pathlib import Path

import cv2
import numpy as np
import simplejpeg
from PIL import Image, ImageCms
from skimage import data

OUT = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "jpeg"
PHOTO = Image.fromarray(data.astronaut())  # 512×512 RGB


def crop(w, h, x=140, y=60):
    """A w×h piece of the photo (tiled when larger than it)."""
    if w <= 512 - x and h <= 512 - y:
        return PHOTO.crop((x, y, x + w, y + h))
    tiled = Image.new("RGB", (w, h))
    for ty in range(0, h, 512):
        for tx in range(0, w, 512):
            tiled.paste(PHOTO, (tx, ty))
    return tiled


def pillow(im, **kw):
    buf = io.BytesIO()
    im.save(buf, "JPEG", **kw)
    return buf.getvalue()


def cjpeg(im, *args):
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "in.ppm"
        im.save(src) if im.mode in ("RGB", "L") else im.convert("RGB").save(src)
        return subprocess.run(["cjpeg", *args, str(src)], check=True, capture_output=True).stdout


def icc_profile():
    return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()


def corpus():
    c = {}
    base = crop(64, 48)
    for ss, name in ((0, "444"), (1, "422"), (2, "420")):
        c[f"pillow-{name}"] = pillow(base, quality=90, subsampling=ss)
        c[f"pillow-{name}-progressive"] = pillow(base, quality=85, subsampling=ss, progressive=True)
    c["pillow-q100-444"] = pillow(base, quality=100, subsampling=0)
    c["pillow-q20-420"] = pillow(base, quality=20, subsampling=2)
    c["pillow-gray"] = pillow(base.convert("L"), quality=90)
    c["pillow-gray-progressive"] = pillow(base.convert("L"), quality=90, progressive=True)
    c["pillow-cmyk"] = pillow(base.convert("CMYK"), quality=90)
    c["pillow-icc"] = pillow(base, quality=90, icc_profile=icc_profile())
    c["pillow-restart-rows"] = pillow(base, quality=90, restart_marker_rows=1)
    c["pillow-restart-blocks"] = pillow(base, quality=90, subsampling=0, restart_marker_blocks=3)
    c["pillow-optimize"] = pillow(base, quality=75, optimize=True)
    # Odd sizes: fancy upsampling's edges, partial MCUs, 1 pixel, the longest side past 4096.
    for (w, h), ss in (
        ((1, 1), 2), ((1, 1), 0), ((2, 3), 2), ((3, 2), 1), ((5, 7), 2), ((7, 5), 1),
        ((17, 13), 2), ((31, 33), 1), ((33, 17), 0), ((4097, 3), 2), ((3, 4097), 2), ((4097, 2), 1),
    ):
        c[f"pillow-{w}x{h}-{['444', '422', '420'][ss]}"] = pillow(crop(w, h), quality=88, subsampling=ss)
    # libjpeg's own encoder: what pillow cannot write.
    c["cjpeg-440"] = cjpeg(base, "-quality", "90", "-sample", "1x2")
    c["cjpeg-440-odd"] = cjpeg(crop(35, 27), "-quality", "90", "-sample", "1x2")
    c["cjpeg-411"] = cjpeg(base, "-quality", "90", "-sample", "4x1")
    c["cjpeg-422-progressive"] = cjpeg(base, "-quality", "85", "-sample", "2x1", "-progressive")
    c["cjpeg-arithmetic"] = cjpeg(base, "-quality", "90", "-arithmetic")
    c["cjpeg-arithmetic-progressive"] = cjpeg(base, "-quality", "90", "-arithmetic", "-progressive")
    c["cjpeg-restart-1"] = cjpeg(base, "-quality", "90", "-restart", "1B")
    c["cjpeg-rgb"] = cjpeg(base, "-quality", "90", "-rgb")
    c["cjpeg-gray"] = cjpeg(base, "-quality", "90", "-grayscale")
    c["cjpeg-smooth"] = cjpeg(base, "-quality", "60", "-smooth", "30")
    with tempfile.TemporaryDirectory() as d:
        icc = Path(d) / "srgb.icc"
        icc.write_bytes(icc_profile())
        c["cjpeg-icc-progressive"] = cjpeg(base, "-quality", "90", "-progressive", "-icc", str(icc))
    # TurboJPEG writes YCCK from CMYK pixels.
    cmyk = np.asarray(base.convert("CMYK"))
    c["turbojpeg-ycck"] = simplejpeg.encode_jpeg(cmyk.copy(), quality=90, colorspace="CMYK", colorsubsampling="420")
    c["turbojpeg-ycck-444"] = simplejpeg.encode_jpeg(cmyk.copy(), quality=90, colorspace="CMYK", colorsubsampling="444")
    # Damaged files.
    good, prog = c["pillow-420"], c["pillow-420-progressive"]
    c["bad-truncated-half"] = good[: len(good) // 2]
    c["bad-truncated-no-eoi"] = good[:-2]
    c["bad-truncated-progressive"] = prog[: len(prog) * 2 // 3]
    c["bad-header-only"] = good[: good.index(b"\xff\xda")]
    sof = good.index(b"\xff\xc0")
    c["bad-zero-width"] = good[: sof + 7] + b"\x00\x00" + good[sof + 9 :]
    dht = good.index(b"\xff\xc4")
    c["bad-huffman-table"] = good[: dht + 5] + b"\xff" * 16 + good[dht + 21 :]
    sos = good.index(b"\xff\xda")
    scan = bytearray(good)
    for i in range(sos + 40, len(good) - 40, 97):  # bit flips in the entropy-coded data
        if scan[i] != 0xFF and scan[i - 1] != 0xFF:
            scan[i] ^= 0x5A
    c["bad-corrupt-scan"] = bytes(scan)
    c["bad-garbage-after-soi"] = b"\xff\xd8\xff" + bytes(range(256)) * 4
    return c


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    for old in OUT.iterdir():
        old.unlink()
    manifest = {}
    for name, blob in corpus().items():
        (OUT / f"{name}.jpg").write_bytes(blob)
        entry = {}
        try:
            with Image.open(io.BytesIO(blob)) as im:
                entry["pillow_mode"] = im.mode
                rgb = im.convert("RGB")
        except Exception as e:  # Pillow's refusal is the expected answer
            entry["pillow_refuses"] = f"{type(e).__name__}: {e}"
            assert not name.startswith(("pillow-", "cjpeg-", "turbojpeg-")), (name, e)
        else:
            rgb.save(OUT / f"{name}.rgb.png", optimize=True)
            entry["size"] = list(rgb.size)
            bgr = cv2.imdecode(np.frombuffer(blob, np.uint8), cv2.IMREAD_COLOR)
            if bgr is None:
                entry["opencv"] = "refuses"
            else:
                diff = np.count_nonzero(bgr[:, :, ::-1] != np.asarray(rgb)) if bgr.shape[:2] == rgb.size[::-1] else -1
                entry["opencv"] = "same" if diff == 0 else f"{diff} values differ"
        manifest[name] = entry
    (OUT / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    for name, entry in manifest.items():
        print(f"{name:34} {entry.get('pillow_mode', ''):5} {entry.get('opencv', '')} {entry.get('pillow_refuses', '')}")


if __name__ == "__main__":
    main()
