#!/usr/bin/env python3
"""Benchmarks inferd against what users run today, on this machine, and
writes docs/BENCHMARKS.md (a table and an SVG chart).

    python3 -m venv /tmp/peers && /tmp/peers/bin/pip install onnxruntime==1.31.1 pillow numpy \
        fastapi uvicorn paho-mqtt rapidocr_onnxruntime==1.4.4
    scripts/setup.sh && cargo build --release --locked
    python3 scripts/bench.py --peer-python /tmp/peers/bin/python [--seconds 10]

For each model (a classifier fed 224x224 photos, and the OCR model on a
receipt) it runs, one after the other on the same box:
  - inferd in-process (`inferd bench --via local`): the engine's own session
    time is the limit any server can reach;
  - the inferd daemon over its Unix socket and over MQTT (mosquitto), N clients;
  - a FastAPI + onnxruntime server (scripts/peers/fastapi_server.py, uvicorn on
    a Unix socket) and a paho-mqtt + onnxruntime worker (scripts/peers/mqtt_worker.py),
    with the same pre- and post-processing, driven by the same `inferd bench`.
It also measures the daemon's idle memory and its start-to-ready time.
"""
import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = ROOT / "target" / "release" / "inferd"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_socket(path, timeout=30):
    end = time.time() + timeout
    while time.time() < end:
        try:
            with socket.socket(socket.AF_UNIX) as s:
                s.connect(str(path))
                return
        except OSError:
            time.sleep(0.005)
    raise SystemExit(f"nothing listens on {path}")


def rss_mib(pid):
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def bench(model, payload, via, clients, seconds, **kw):
    cmd = [str(BIN), "bench", "--model", model, "--via", via, "--clients", str(clients),
           "--duration", str(seconds), "--json", str(payload)]
    for k, v in kw.items():
        cmd += [f"--{k.replace('_', '-')}", str(v)]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed: {out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--peer-python", required=True, help="a Python with the peers' packages")
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--out", default=str(ROOT / "docs" / "BENCHMARKS.md"))
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="inferd-bench-"))
    # A 224x224 photo-like JPEG for the classifier.
    subprocess.run([args.peer_python, "-c", f"""
from PIL import Image
import numpy as np
rng = np.random.default_rng(7)
x = np.linspace(0, 255, 224)
img = np.stack([np.add.outer(x, x) / 2, np.add.outer(x[::-1], x) / 2, rng.integers(0, 255, (224, 224))], -1)
Image.fromarray(img.astype('uint8')).save('{work}/photo224.jpg', quality=90)
"""], check=True)
    models = [("tinycnn", work / "photo224.jpg", 8), ("ocr", ROOT / "tests/fixtures/ocr/receipt.png", 2)]
    procs = []
    try:
        port = free_port()
        conf = work / "mosquitto.conf"
        conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\nuser root\nmax_inflight_messages 0\nset_tcp_nodelay true\n")
        procs.append(subprocess.Popen(["mosquitto", "-c", str(conf)], stderr=subprocess.DEVNULL))
        time.sleep(0.3)
        # The daemon: start-to-ready (socket answering) and idle memory, before any model loads.
        sock = work / "inferd.sock"
        env = dict(os.environ, INFERD_SOCKET__PATH=str(sock), INFERD_MEMORY__STATE_DIR=str(work / "state"),
                   INFERD_MQTT__URL=f"mqtt://127.0.0.1:{port}", INFERD_MQTT__NODE_ID="bench", INFERD_LOG__LEVEL="warn")
        t0 = time.perf_counter()
        daemon = subprocess.Popen([str(BIN), "serve"], cwd=ROOT, env=env, stderr=subprocess.DEVNULL)
        procs.append(daemon)
        wait_socket(sock)
        ready_ms = (time.perf_counter() - t0) * 1000
        time.sleep(1.0)
        idle_rss = rss_mib(daemon.pid)
        peer_sock = work / "peer.sock"
        procs.append(subprocess.Popen([args.peer_python, "-m", "uvicorn", "--app-dir", str(ROOT / "scripts/peers"),
                                       "fastapi_server:app", "--uds", str(peer_sock), "--workers", "1",
                                       "--log-level", "warning"], cwd=ROOT))
        procs.append(subprocess.Popen([args.peer_python, str(ROOT / "scripts/peers/mqtt_worker.py"), "--port",
                                       str(port), "--prefix", "peer"], cwd=ROOT))
        wait_socket(peer_sock)
        time.sleep(1.0)
        rows = []
        for model, payload, clients in models:
            s = args.seconds
            runs = [
                ("inferd in-process", bench(model, payload, "local", 1, s)),
                ("inferd, Unix socket", bench(model, payload, "socket", clients, s, socket=sock)),
                ("inferd, MQTT", bench(model, payload, "mqtt", clients, s, mqtt_url=f"mqtt://127.0.0.1:{port}")),
                ("FastAPI + onnxruntime", bench(model, payload, "socket", clients, s, socket=peer_sock)),
                ("paho-mqtt + onnxruntime", bench(model, payload, "mqtt", clients, s,
                                                  mqtt_url=f"mqtt://127.0.0.1:{port}", mqtt_prefix="peer")),
            ]
            for name, r in runs:
                rows.append((model, name, r))
                print(f"{model:8} {name:26} {r['jobs_per_s']:9.1f} jobs/s  p50 {r['p50_ms']:8.2f}  p99 {r['p99_ms']:8.2f}"
                      f"  errors {r['errors']}", flush=True)
        loaded_rss = rss_mib(daemon.pid)
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
    write_report(Path(args.out), rows, ready_ms, idle_rss, loaded_rss, args.seconds)


def write_report(out, rows, ready_ms, idle_rss, loaded_rss, seconds):
    cpu = next((l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                if l.startswith("model name")), platform.processor())
    cores = os.cpu_count()
    by = {(m, n): r for m, n, r in rows}
    lines = [
        "# Benchmarks",
        "",
        f"Measured {date.today().isoformat()} on {cpu}, {cores} cores, {platform.system()} {platform.release()},",
        f"ONNX Runtime 1.31.1 on CPU (no GPU was lent to this run), {seconds:g} s per line, one after the other.",
        "Made by `scripts/bench.py` (see its header for the set-up); every line is `inferd bench` driving",
        "the server named, with the same payload. Latency is per job as its client sees it.",
        "",
        "| model | server | clients | jobs/s | p50 ms | p95 ms | p99 ms | engine p50 ms | errors |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for m, n, r in rows:
        eng = f"{r['engine_p50_ms']:.2f}" if r.get("engine_p50_ms") is not None else "-"
        lines.append(f"| {m} | {n} | {r['clients']} | {r['jobs_per_s']:.1f} | {r['p50_ms']:.2f} | {r['p95_ms']:.2f} "
                     f"| {r['p99_ms']:.2f} | {eng} | {r['errors']} |")
    lines += ["", "![throughput](benchmarks.svg)", "", "## Targets", ""]
    for m in sorted({m for m, _, _ in rows}):
        local = by[(m, "inferd in-process")]
        sock, mq = by[(m, "inferd, Unix socket")], by[(m, "inferd, MQTT")]
        fa, pm = by[(m, "FastAPI + onnxruntime")], by[(m, "paho-mqtt + onnxruntime")]
        over = local["overhead_p50_ms"]
        lines.append(f"- **{m}**: in-process overhead over the engine call {over:.2f} ms at p50 "
                     f"(target ≤ 0.3 ms for a 224×224 classifier); socket throughput "
                     f"{sock['jobs_per_s'] / max(fa['jobs_per_s'], 1e-9):.1f}× FastAPI's, MQTT "
                     f"{mq['jobs_per_s'] / max(pm['jobs_per_s'], 1e-9):.1f}× the Python worker's (targets ≥ 3×).")
    lines += [
        f"- **Start to ready**: {ready_ms:.0f} ms from exec to the socket answering, lazy loading (target ≤ 100 ms).",
        f"- **Idle memory**: {idle_rss:.1f} MiB resident with no model loaded (target ≤ 20 MB); "
        f"{loaded_rss:.0f} MiB after these runs, with their models loaded.",
        "",
    ]
    # A hand-written analysis after the generated part survives a re-run.
    kept = ""
    if out.exists() and "\n## Analysis" in out.read_text():
        kept = out.read_text()[out.read_text().index("\n## Analysis"):]
    out.write_text("\n".join(lines) + kept)
    write_svg(out.parent / "benchmarks.svg", rows)
    print(f"wrote {out}")


def write_svg(path, rows):
    """Horizontal bars of throughput, one group per model, log scale."""
    import math
    w, bar, gap, left = 760, 18, 6, 330
    top = max(r["jobs_per_s"] for _, _, r in rows)
    y, parts = 30, []
    for m in sorted({m for m, _, _ in rows}, key=lambda m: [x for x, _, _ in rows].index(m)):
        parts.append(f'<text x="10" y="{y}" font-weight="bold">{m}</text>')
        y += 8
        for mm, n, r in rows:
            if mm != m:
                continue
            v = max(r["jobs_per_s"], 0.1)
            length = (math.log10(v) + 1) / (math.log10(top) + 1) * (w - left - 90)
            color = "#2b7bb9" if n.startswith("inferd") else "#c0504d"
            parts.append(f'<text x="20" y="{y + 13}">{n}</text>')
            parts.append(f'<rect x="{left}" y="{y}" width="{length:.1f}" height="{bar}" fill="{color}"/>')
            parts.append(f'<text x="{left + length + 6:.1f}" y="{y + 13}">{r["jobs_per_s"]:.1f}/s</text>')
            y += bar + gap
        y += 14
    svg = (f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{y}" font-family="sans-serif" font-size="13">'
           f'<text x="{left}" y="16" fill="#555">jobs per second (log scale)</text>' + "".join(parts) + "</svg>\n")
    path.write_text(svg)


if __name__ == "__main__":
    sys.exit(main())
