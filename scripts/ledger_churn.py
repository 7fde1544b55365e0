#!/usr/bin/env python3
"""Memory ledger under churn: clients cycling ocr/minilm/color/receipt (and,
with --chat, one client chatting with smollm2) under memory.budget_mb, for a
while; then what is loaded against what is charged, the loads and evictions
counted in /metrics, and the latencies. The numbers of docs/RELIABILITY.md
("Memory ledger under churn") come from:

    scripts/ledger_churn.py --budget 700 --seconds 60 --chat
    scripts/ledger_churn.py --budget 900 --seconds 90 --chat

--bin picks the binary (default target/release/inferd, else target/debug/inferd).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from socket_client import UnixConnection  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def request(sock, method, path, body=None, kind="application/json"):
    c = UnixConnection(sock)
    t0 = time.perf_counter()
    c.request(method, path, body, {"Content-Type": kind} if body is not None else {})
    r = c.getresponse()
    data = r.read()
    c.close()
    return r.status, data, time.perf_counter() - t0


def jobs():
    return [
        ("ocr", "image/png", (ROOT / "tests/fixtures/ocr/receipt.png").read_bytes()),
        ("minilm", "application/json", json.dumps({"text": ["a camera on the gate", "a sensor in the hall"]}).encode()),
        ("color", "image/jpeg", (ROOT / "examples/red.jpg").read_bytes()),
        ("receipt", "image/png", (ROOT / "tests/fixtures/ocr/cafe.png").read_bytes()),
    ]


CHAT = json.dumps({"model": "smollm2", "messages": [{"role": "user", "content": "Tell me about the sea."}],
                   "temperature": 0, "max_tokens": 16}).encode()


def cycle(sock, offset, until, out):
    js = jobs()
    i = offset
    while time.monotonic() < until:
        model, kind, body = js[i % len(js)]
        status, _, secs = request(sock, "POST", f"/v1/models/{model}/infer", body, kind)
        out.append((model, status, secs))
        i += 1


def chat(sock, until, out):
    while time.monotonic() < until:
        status, data, secs = request(sock, "POST", "/v1/chat/completions", CHAT)
        out.append(("smollm2", status, secs))
        if status != 200:
            time.sleep(0.2)


def metric_sum(text, name, **labels):
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def rss_mib(pid):
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def p50(xs):
    return statistics.median(xs) if xs else float("nan")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default=None)
    ap.add_argument("--budget", type=int, default=900)
    ap.add_argument("--seconds", type=float, default=90)
    ap.add_argument("--clients", type=int, default=6)
    ap.add_argument("--chat", action="store_true", help="one client chatting with smollm2 throughout")
    ap.add_argument("--label", default="")
    args = ap.parse_args()
    binary = args.bin or next(str(p) for p in (ROOT / "target/release/inferd", ROOT / "target/debug/inferd")
                              if p.exists())
    work = Path(tempfile.mkdtemp(prefix="ledger-churn-"))
    sock = str(work / "inferd.sock")
    env = dict(os.environ, INFERD_SOCKET__PATH=sock, INFERD_MODELS=str(ROOT / "models.json"),
               INFERD_MEMORY__STATE_DIR=str(work / "state"), INFERD_MEMORY__BUDGET_MB=str(args.budget),
               INFERD_LOG__LEVEL="info,ort=warn")
    env.pop("ORT_DYLIB_PATH", None)
    log = open(work / "inferd.log", "w")
    daemon = subprocess.Popen([binary, "serve"], env=env, cwd=ROOT, stderr=log)
    try:
        for _ in range(1500):
            if os.path.exists(sock):
                break
            time.sleep(0.02)
        start_rss = rss_mib(daemon.pid)
        resident_chat = []
        if args.chat:
            # The chat alone first: its latency with the model resident.
            for _ in range(6):
                status, _, secs = request(sock, "POST", "/v1/chat/completions", CHAT)
                resident_chat.append(secs)
            request(sock, "POST", "/v1/models/smollm2/unload")
            time.sleep(0.5)
            _, m0, _ = request(sock, "GET", "/metrics")
            loads0 = metric_sum(m0.decode(), "inferd_model_events_total", event="load")
            evictions0 = metric_sum(m0.decode(), "inferd_model_events_total", event="evict")
        else:
            loads0 = evictions0 = 0.0
        until = time.monotonic() + args.seconds
        results, threads = [], []
        for i in range(args.clients):
            threads.append(threading.Thread(target=cycle, args=(sock, i, until, results)))
        if args.chat:
            threads.append(threading.Thread(target=chat, args=(sock, until, results)))
        peak = start_rss
        for t in threads:
            t.start()
        while any(t.is_alive() for t in threads):
            peak = max(peak, rss_mib(daemon.pid))
            time.sleep(0.2)
        _, models, _ = request(sock, "GET", "/v1/models")
        _, metrics, _ = request(sock, "GET", "/metrics")
        metrics = metrics.decode()
        loaded = {m["name"]: (m.get("running") or {}).get("charged_bytes") or m.get("charged_bytes") or 0
                  for m in json.loads(models)["models"] if m.get("loaded")}
        charged_mib = {k: round(v / 2**20) for k, v in loaded.items()}
        room = metric_sum(metrics, "inferd_memory_room_bytes") if "inferd_memory_room_bytes" in metrics else None
        for line in metrics.splitlines():
            if line.startswith("inferd_memory_room_bytes "):
                room = float(line.split()[1])
        by_model = {}
        for model, status, secs in results:
            d = by_model.setdefault(model, {"ok": 0, "errors": {}, "secs": []})
            if status == 200:
                d["ok"] += 1
                d["secs"].append(secs)
            else:
                d["errors"][status] = d["errors"].get(status, 0) + 1
        summary = {
            "label": args.label, "binary": binary, "budget_mb": args.budget, "seconds": args.seconds,
            "clients": args.clients, "chat": args.chat,
            "loads": metric_sum(metrics, "inferd_model_events_total", event="load") - loads0,
            "evictions": metric_sum(metrics, "inferd_model_events_total", event="evict") - evictions0,
            "loaded_charged_mib": charged_mib,
            "uncharged_loaded": sorted(k for k, v in loaded.items() if not v),
            "charged_total_mib": sum(charged_mib.values()),
            "room_mib": None if room is None else round(room / 2**20),
            "rss_start_mib": round(start_rss), "rss_peak_mib": round(peak), "rss_end_mib": round(rss_mib(daemon.pid)),
            "resident_chat_p50_s": round(p50(resident_chat), 3) if resident_chat else None,
            "per_model": {m: {"ok": d["ok"], "errors": d["errors"], "p50_s": round(p50(d["secs"]), 3)}
                          for m, d in sorted(by_model.items())},
        }
        print(json.dumps(summary, indent=1))
    finally:
        daemon.terminate()
        daemon.wait()
        log.close()


if __name__ == "__main__":
    main()
