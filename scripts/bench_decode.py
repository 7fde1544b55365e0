#!/usr/bin/env python3
"""Decode + resize time per megapixel: inferd's JPEG path now (libjpeg-turbo)
and before (the image crate; jpeg-decoder's reduced-scale IDCT), libjpeg-turbo's
own reduced-scale decode (measured, left off), and what Python servers run
(Pillow, OpenCV), one thread each, on the same camera-sized photos, in one run.

    python3 -m venv /tmp/pil && /tmp/pil/bin/pip install pillow==12.0.0 \\
        opencv-python-headless==5.1.0.95 scikit-image==0.26.0 numpy
    cargo build --release --locked --example decode_bench
    /tmp/pil/bin/python scripts/bench_decode.py [--seconds 2]

The photos are scikit-image's `astronaut`, `coffee` and `chelsea` scaled to
phone and camera sizes with a little sensor noise, saved as cameras save them
(quality 90, 4:2:0). The resize is a 224×224 center crop (EfficientNet-Lite0's
input) and the tensor layout, normalised, as inferd's classifier path does.
"""
import argparse
import io
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
import cv2  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402
from skimage import data  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "target" / "release" / "examples" / "decode_bench"
SIZES = [(640, 480), (1280, 720), (1920, 1080), (4032, 3024)]
MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)


def photos(work):
    rng = np.random.default_rng(7)
    sources = [data.astronaut(), data.coffee(), data.chelsea()]
    files = []
    for i, (w, h) in enumerate(SIZES):
        im = Image.fromarray(sources[i % len(sources)]).resize((w, h), Image.Resampling.LANCZOS)
        noisy = np.clip(np.asarray(im, np.float32) + rng.normal(0, 3, (h, w, 3)), 0, 255).astype(np.uint8)
        path = Path(work) / f"photo-{w}x{h}.jpg"
        Image.fromarray(noisy).save(path, quality=90, subsampling=2)
        files.append(path)
    return files


def crop_box(w, h, size=224):
    scale = max(size / w, size / h)
    cw, ch = size / scale, size / scale
    return ((w - cw) / 2, (h - ch) / 2, (w + cw) / 2, (h + ch) / 2)


def median_ms(seconds, f):
    f()
    runs, end = [], time.perf_counter() + seconds
    while len(runs) < 5 or time.perf_counter() < end:
        t = time.perf_counter()
        f()
        runs.append((time.perf_counter() - t) * 1e3)
    return sorted(runs)[len(runs) // 2]


def peers(path, seconds):
    blob = path.read_bytes()
    w, h = Image.open(io.BytesIO(blob)).size
    box = crop_box(w, h)

    def pillow_decode():
        return Image.open(io.BytesIO(blob)).convert("RGB")

    def pillow_full():
        im = pillow_decode().resize((224, 224), Image.Resampling.BILINEAR, box=box)
        return ((np.asarray(im, np.float32) / 255 - MEAN) / STD).transpose(2, 0, 1)

    def opencv_decode():
        return cv2.imdecode(np.frombuffer(blob, np.uint8), cv2.IMREAD_COLOR)

    def opencv_full():
        img = opencv_decode()
        x0, y0, x1, y1 = (int(round(v)) for v in box)
        im = cv2.resize(img[y0:y1, x0:x1], (224, 224), interpolation=cv2.INTER_LINEAR)[:, :, ::-1]
        return ((im.astype(np.float32) / 255 - MEAN) / STD).transpose(2, 0, 1)

    cv2.setNumThreads(1)
    return [
        ("Pillow decode", median_ms(seconds, pillow_decode)),
        ("Pillow decode + resize + tensor", median_ms(seconds, pillow_full)),
        ("OpenCV imdecode", median_ms(seconds, opencv_decode)),
        ("OpenCV imdecode + resize + tensor", median_ms(seconds, opencv_full)),
    ]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=2.0)
    args = ap.parse_args()
    if not EXAMPLE.exists():
        raise SystemExit(f"{EXAMPLE} is missing: cargo build --release --locked --example decode_bench")
    with tempfile.TemporaryDirectory() as work:
        files = photos(work)
        out = subprocess.run(
            [str(EXAMPLE), str(args.seconds), *map(str, files)], check=True, capture_output=True, text=True
        ).stdout
        rows = {}
        for line in out.splitlines():
            r = json.loads(line)
            rows.setdefault(r["path"], {})[Path(r["file"]).name] = r["ms"]
        for f in files:
            for name, ms in peers(f, args.seconds):
                rows.setdefault(name, {})[f.name] = ms
    names = [f.name for f in files]
    mp = {f.name: w * h / 1e6 for f, (w, h) in zip(files, SIZES)}
    print("| path (one thread) | " + " | ".join(f"{w}×{h} ms (ms/MP)" for w, h in SIZES) + " |")
    print("|---|" + "---|" * len(SIZES))
    for path, by in rows.items():
        cells = [f"{by[n]:.2f} ({by[n] / mp[n]:.2f})" for n in names]
        print(f"| {path} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
