#!/usr/bin/env python3
"""Measures the vision-language task through the daemon, as a client sees it,
on the tiny SmolVLM fixture (tests/fixtures/vlm/model): the image processor's
cost per megapixel (decode, resize, views, normalisation: the answer's
`timings.pre_ms`), time to first token and decode tokens/s at 1 and 4
streams, and the vision encoder's share of the first token (a new image
against the same image again, whose features come from the cache).

    cargo build --release --locked
    python3 -m venv /tmp/bench && /tmp/bench/bin/pip install pillow==13.0.0
    /tmp/bench/bin/python scripts/bench_vlm.py [--threads 2] [--rounds 5] [--peer-python /tmp/hf/bin/python]

With --peer-python (a Python with transformers 4.57.1, torch and Pillow, as
scripts/make_vlm_fixture_model.py needs) transformers runs the same model
(its safetensors) and the same processor settings on the same images, torch
on the same number of threads: scripts/peers/transformers_vlm.py.

The fixture's weights are random and tiny (144k parameters), so its times
show inferd's own costs (processor, splicing, the loop, the socket) rather
than a real model's arithmetic; the same script runs a real entry with
--models and --model.
"""
import argparse
import io
import json
import os
import statistics
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from PIL import Image
from socket_client import UnixConnection

ROOT = Path(__file__).resolve().parent.parent
BIN = ROOT / "target" / "release" / "inferd"
FIXTURE = ROOT / "tests" / "fixtures" / "vlm"
SIZES = [(640, 480), (1280, 960), (2560, 1920), (4000, 3000)]  # 0.3, 1.2, 4.9, 12 MP
QUESTION = "Is the gate open?"


def photo(w, h, seed):
    """A camera-like JPEG: smooth gradients and a few shapes, different bytes per seed."""
    img = Image.linear_gradient("L").resize((w, h)).convert("RGB")
    px = img.load()
    for i in range(200):
        x, y = (seed * 7919 + i * 104729) % w, (seed * 104723 + i * 7907) % h
        px[x, y] = ((seed * 37 + i) % 256, (i * 11) % 256, (seed + i * 5) % 256)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def body(model, image, max_tokens, stream):
    import base64
    url = "data:image/jpeg;base64," + base64.b64encode(image).decode()
    return json.dumps({"model": model, "temperature": 0, "max_tokens": max_tokens, "stream": stream, "messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": QUESTION}]}]})


def whole(sock, model, image, max_tokens):
    c = UnixConnection(sock)
    c.request("POST", "/v1/chat/completions", body(model, image, max_tokens, False), {"Content-Type": "application/json"})
    answer = json.loads(c.getresponse().read())
    if "usage" not in answer:
        raise SystemExit(f"{model}: {answer}")
    return answer


def concurrent(sock, model, images, max_tokens):
    """One whole request per image, all at once: each one's latency (s), its answer, and the wall time."""
    out = [None] * len(images)

    def one(i):
        t0 = time.perf_counter()
        answer = whole(sock, model, images[i], max_tokens)
        out[i] = (time.perf_counter() - t0, answer)

    ts = [threading.Thread(target=one, args=(i,)) for i in range(len(images))]
    t0 = time.perf_counter()
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return out, time.perf_counter() - t0


def encoder_ms(log):
    """The vision encoder's runs so far, in ms, from the daemon's debug log."""
    import re
    return [float(m.group(1)) for m in re.finditer(r"vision encoder.*?ms=([0-9.]+)", Path(log).read_text())]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default=str(FIXTURE / "model" / "models.json"))
    ap.add_argument("--model", default="tiny-vlm")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--peer-python", help="a Python with transformers, torch and Pillow: run transformers as the peer")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-vlm-"))
    registry = json.loads(Path(args.models).read_text())
    base = Path(args.models).resolve().parent
    for m in registry["models"]:  # absolute paths, so the registry can live in the work folder
        m["generation"]["tokenizer"] = str(base / m["generation"]["tokenizer"])
        m["generation"]["chat_template"] = str(base / m["generation"]["chat_template"])
        for v in m["variants"]:
            v["file"] = str(base / v["file"])
            for p in v.get("parts", {}).values():
                p["file"] = str(base / p["file"])
    (work / "models.json").write_text(json.dumps(registry))
    sock = str(work / "inferd.sock")
    env = dict(os.environ, INFERD_SOCKET__PATH=sock, INFERD_MODELS=str(work / "models.json"),
               INFERD_MODELS_OUTSIDE="true", INFERD_MEMORY__STATE_DIR=str(work / "state"),
               # The vision encoder's own runs, logged with their time.
               INFERD_LOG__LEVEL="warn,inferd::pipeline::vision=debug", INFERD_RUNTIME__INTRA_THREADS=str(args.threads))
    log = open(work / "daemon.log", "w")
    daemon = subprocess.Popen([str(BIN), "serve"], env=env, stderr=log)
    seed = iter(range(1, 1 << 30))
    rows = {}
    try:
        for _ in range(500):
            if os.path.exists(sock):
                break
            time.sleep(0.02)
        whole(sock, args.model, photo(320, 240, next(seed)), 2)  # load and warm up
        # The image processor per megapixel: each round a new image (no cache).
        for w, h in SIZES:
            pre = [whole(sock, args.model, photo(w, h, next(seed)), 1)["timings"]["pre_ms"] for _ in range(args.rounds)]
            rows[f"pre {w}x{h}"] = statistics.median(pre)
        # The first token (a request for one token) with a new image, and the same image again (features cached).
        cold, warm, pre = [], [], []
        seen = len(encoder_ms(work / "daemon.log"))
        for _ in range(args.rounds):
            image = photo(1280, 960, next(seed))
            [(new, answer)], _ = concurrent(sock, args.model, [image], 1)
            [(again, _)], _ = concurrent(sock, args.model, [image], 1)
            cold.append(new * 1000)
            warm.append(again * 1000)
            pre.append(answer["timings"]["pre_ms"])
        encoder = encoder_ms(work / "daemon.log")[seen:]
        assert len(encoder) == args.rounds, f"{len(encoder)} vision encoder runs for {args.rounds} new images"
        completion = whole(sock, args.model, photo(1280, 960, next(seed)), args.tokens)["usage"]["completion_tokens"]
        # Decoding: answers of `completion` tokens against answers of one, each with a new image;
        # the difference is the other tokens' time (as the peer measures it).
        decode = {}
        for streams in (1, 4):
            ttft, rate, total = [], [], []
            for _ in range(args.rounds):
                first, _ = concurrent(sock, args.model, [photo(1280, 960, next(seed)) for _ in range(streams)], 1)
                full, wall = concurrent(sock, args.model, [photo(1280, 960, next(seed)) for _ in range(streams)],
                                        completion)
                t1, tn = statistics.mean(x[0] for x in first), statistics.mean(x[0] for x in full)
                ttft.append(t1)
                rate.append((completion - 1) / (tn - t1))
                total.append(streams * completion / wall)
            decode[streams] = (statistics.median(ttft) * 1000, statistics.median(rate), statistics.median(total))
    finally:
        daemon.terminate()
        daemon.wait()
    cold_ms, warm_ms, pre_ms, encoder = (statistics.median(x) for x in (cold, warm, pre, encoder))
    log.close()
    print(f"inferd, {args.model}, {args.threads} threads, median of {args.rounds}\n")
    print("| image | megapixels | image processor ms | ms per megapixel |")
    print("|---|---|---|---|")
    for w, h in SIZES:
        ms = rows[f"pre {w}x{h}"]
        print(f"| {w}×{h} JPEG | {w * h / 1e6:.1f} | {ms:.1f} | {ms / (w * h / 1e6):.1f} |")
    print("\n| streams | time to first token ms (new 1280×960 image) | decode tok/s per stream | tokens/s, all streams over the wall time of whole answers |")
    print("|---|---|---|---|")
    for streams, (ttft, rate, total) in decode.items():
        print(f"| {streams} | {ttft:.1f} | {rate:.0f} | {total:.0f} |")
    print(f"\nfirst token, new image {cold_ms:.1f} ms; same image again (features cached) {warm_ms:.1f} ms; "
          f"of the first: image processor {pre_ms:.1f} ms ({pre_ms / cold_ms:.0%}), vision encoder {encoder:.2f} ms "
          f"({encoder / cold_ms:.0%}); {completion} tokens per answer")
    if args.peer_python:
        sizes = json.dumps(SIZES)
        out = subprocess.run([args.peer_python, str(ROOT / "scripts/peers/transformers_vlm.py"), str(FIXTURE / "model"),
                              sizes, str(args.threads), str(args.rounds), str(completion)],
                             capture_output=True, text=True)
        if out.returncode != 0:
            raise SystemExit(f"transformers failed: {out.stderr}")
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"\ntransformers {r['version']} (torch {r['torch']}, {args.threads} threads), same model and images:\n")
        print("| image | transformers processor ms | inferd ms | inferd speed-up |")
        print("|---|---|---|---|")
        for (w, h), ms in zip(SIZES, r["pre_ms"]):
            ours = rows[f"pre {w}x{h}"]
            print(f"| {w}×{h} | {ms:.1f} | {ours:.1f} | {ms / ours:.1f}× |")
        print(f"\n| | transformers | inferd | ratio |\n|---|---|---|---|")
        print(f"| time to first token ms (new 1280×960 image, 1 stream) | {r['ttft_ms']:.1f} | {decode[1][0]:.1f} | "
              f"{r['ttft_ms'] / decode[1][0]:.1f}× |")
        print(f"| decode tok/s, 1 stream | {r['decode_tok_s']:.0f} | {decode[1][1]:.0f} | "
              f"{decode[1][1] / r['decode_tok_s']:.1f}× |")


if __name__ == "__main__":
    main()
