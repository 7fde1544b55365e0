#!/usr/bin/env python3
"""Decode + resize time per megapixel: inferd's JPEG path now (libjpeg-turbo)
and before (the image crate; jpeg-decoder's reduced-scale IDCT), libjpeg-turbo's
own reduced-scale decode (measured, left off), and what Python servers run
(Pillow, OpenCV), one thread each, on the same camera-sized photos, in one run.

    python3 -m venv /tmp/pil && /tmp/pil/bin/pip install pillow==12.0.0 \\
        opencv-python-headless==5.1.0.95 scikit-image==0.26.0 numpy onnx
    cargo build --release --locked --bin inferd --example decode_bench
    /tmp/pil/bin/python scripts/bench_decode.py [--seconds 2] [--before-bin OLD/inferd]

The photos are scikit-image's `astronaut`, `coffee` and `chelsea` scaled to
phone and camera sizes with a little sensor noise, saved as cameras save them
(quality 90, 4:2:0). The resize is a 224×224 center crop (EfficientNet-Lite0's
input) and the tensor layout, normalised, as inferd's classifier path does.

Then the socket path: the daemon serving a 224×224-input classifier (a pooled
linear head with EfficientNet-Lite0's input and 1,000 classes, made here with
`onnx`, so the engine's time is small and the image work shows), driven by
`inferd bench --via socket` with 2 clients per photo size, for this build and,
with `--before-bin`, an inferd built before libjpeg-turbo (same registry).
"""
import argparse
import hashlib
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

from bench import wait_socket  # noqa: E402  (scripts/bench.py, beside this one)

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "target" / "release" / "examples" / "decode_bench"
BIN = ROOT / "target" / "release" / "inferd"
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


def classifier(work):
    """A 224×224-input classifier: global average pool and a 3×1000 linear head."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(3)
    w = numpy_helper.from_array(rng.normal(0, 1, (3, 1000)).astype(np.float32), "w")
    b = numpy_helper.from_array(np.zeros(1000, np.float32), "b")
    graph = helper.make_graph(
        [
            helper.make_node("GlobalAveragePool", ["images"], ["pooled"]),
            helper.make_node("Flatten", ["pooled"], ["flat"]),
            helper.make_node("Gemm", ["flat", "w", "b"], ["logits"]),
        ],
        "lite0_sized",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, 224, 224])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 1000])],
        [w, b],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = Path(work) / "lite0-sized.onnx"
    onnx.save(model, path)
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    registry = {"version": 1, "models": [{
        "name": "lite0-sized", "task": "image-classification",
        "variants": [{"name": "fp32", "file": str(path), "sha256": sha}],
        "input": {"tensor": "images", "layout": "NCHW", "width": 224, "height": 224, "resize": "center-crop",
                  "mean": list(map(float, MEAN)), "std": list(map(float, STD))},
        "output": {"tensor": "logits", "top_k": 1},
    }]}
    reg = Path(work) / "models.json"
    reg.write_text(json.dumps(registry))
    return reg


def socket_path(binary, registry, files, seconds, work, tag):
    sock = Path(work) / f"{tag}.sock"
    env = dict(os.environ, INFERD_SOCKET__PATH=str(sock), INFERD_MODELS=str(registry), INFERD_MODELS_OUTSIDE="true",
               INFERD_MEMORY__STATE_DIR=str(Path(work) / f"state-{tag}"), INFERD_LOG__LEVEL="warn")
    daemon = subprocess.Popen([str(binary), "serve"], cwd=ROOT, env=env, stderr=subprocess.DEVNULL)
    try:
        wait_socket(sock)
        out = {}
        for f in files:
            cmd = [str(binary), "bench", "--model", "lite0-sized", "--via", "socket", "--socket", str(sock),
                   "--clients", "2", "--duration", str(seconds), "--json", str(f)]
            r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, check=True)
            out[f.name] = json.loads(r.stdout.strip().splitlines()[-1])
        return out
    finally:
        daemon.terminate()
        daemon.wait(timeout=10)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--before-bin", help="an inferd built before libjpeg-turbo, for the socket path")
    ap.add_argument("--now-bin", default=str(BIN), help="this inferd (default target/release/inferd)")
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
        registry = classifier(work)
        served = [("inferd now (libjpeg-turbo)", socket_path(args.now_bin, registry, files, args.seconds * 2, work, "now"))]
        if args.before_bin:
            before = socket_path(args.before_bin, registry, files, args.seconds * 2, work, "before")
            served.insert(0, ("inferd before (image crate, jpeg-decoder scaled)", before))
    names = [f.name for f in files]
    mp = {f.name: w * h / 1e6 for f, (w, h) in zip(files, SIZES)}
    print("| path (one thread) | " + " | ".join(f"{w}×{h} ms (ms/MP)" for w, h in SIZES) + " |")
    print("|---|" + "---|" * len(SIZES))
    for path, by in rows.items():
        cells = [f"{by[n]:.2f} ({by[n] / mp[n]:.2f})" for n in names]
        print(f"| {path} | " + " | ".join(cells) + " |")
    print()
    print("| socket path, 2 clients | " + " | ".join(f"{w}×{h} jobs/s (p50 ms)" for w, h in SIZES) + " |")
    print("|---|" + "---|" * len(SIZES))
    for name, by in served:
        cells = [f"{by[n]['jobs_per_s']:.1f} ({by[n]['p50_ms']:.2f})" for n in names]
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
