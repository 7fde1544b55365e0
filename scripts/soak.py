#!/usr/bin/env python3
"""Soak run: steady load at a share of measured capacity over the Unix socket
and MQTT at once, for a bounded time, sampling the daemon every minute.

    scripts/setup.sh && cargo build --release --locked
    python3 scripts/soak.py [--minutes 30] [--load 0.8] [--model tinycnn]

It starts mosquitto (Debian's) on a free loopback port and the release
daemon, measures the model's capacity over the socket (8 clients, 10 s),
then drives `inferd bench --rate` over the socket and over MQTT, each at
half of `--load` x capacity, minute after minute. Each minute it records
the daemon's resident memory, open file descriptors and threads, and both
transports' p50/p99 latency and errors. At the end it checks that, after a
warm-up of 2 minutes, none of RSS, fds and threads grew beyond its bound
(RSS: 16 MiB over the warm-up's highest; fds and threads: not above the
warm-up's highest), prints the table and writes it to
target/soak/soak.md (and --out, for docs/RELIABILITY.md).
"""
import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = ROOT / "target" / "release" / "inferd"
WARMUP_MINUTES = 2
RSS_GROWTH_MIB = 16


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def proc_sample(pid):
    status = Path(f"/proc/{pid}/status").read_text()
    field = lambda name: int(next(l.split()[1] for l in status.splitlines() if l.startswith(name + ":")))  # noqa: E731
    return {"rss_mib": round(field("VmRSS") / 1024, 1), "threads": field("Threads"),
            "fds": len(os.listdir(f"/proc/{pid}/fd"))}


def bench(args, via, rate, seconds, sock, mqtt_url, payload):
    cmd = [str(BIN), "bench", "--model", args.model, str(payload), "--via", via, "--clients", "8",
           "--duration", str(seconds), "--warmup", "0", "--json", "--socket", str(sock), "--mqtt-url", mqtt_url]
    if rate:
        cmd += ["--rate", str(rate)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 120)
    if out.returncode != 0:
        return {"error": out.stderr.strip()[-300:]}
    return json.loads(out.stdout)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--minutes", type=int, default=30)
    ap.add_argument("--load", type=float, default=0.8)
    ap.add_argument("--model", default="tinycnn")
    ap.add_argument("--input", default=str(ROOT / "examples" / "red.jpg"))
    ap.add_argument("--out", help="also write the markdown table here")
    args = ap.parse_args()
    if not BIN.exists():
        sys.exit(f"{BIN} is missing: cargo build --release --locked")
    work = Path(tempfile.mkdtemp(prefix="inferd-soak-"))
    port = free_port()
    (work / "mosquitto.conf").write_text(
        f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\nuser root\nmax_queued_messages 100000\nmax_inflight_messages 0\nset_tcp_nodelay true\n")
    broker = subprocess.Popen(["mosquitto", "-c", str(work / "mosquitto.conf")],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    sock = work / "inferd.sock"
    env = dict(os.environ, INFERD_SOCKET__PATH=str(sock), INFERD_MEMORY__STATE_DIR=str(work / "state"),
               INFERD_MQTT__URL=f"mqtt://127.0.0.1:{port}", INFERD_MQTT__NODE_ID="soak",
               INFERD_MODELS=str(ROOT / "models.json"))
    daemon = subprocess.Popen([str(BIN), "serve"], env=env, stdout=subprocess.DEVNULL,
                              stderr=open(work / "inferd.log", "w"))
    try:
        for _ in range(200):
            if sock.exists():
                break
            time.sleep(0.05)
        mqtt_url = f"mqtt://127.0.0.1:{port}"
        capacity = bench(args, "socket", None, 10, sock, mqtt_url, args.input)
        if "error" in capacity:
            sys.exit(f"capacity run failed: {capacity['error']}")
        cap = capacity["jobs_per_s"]
        rate = round(cap * args.load / 2, 1)
        print(f"capacity {cap:.0f} jobs/s over the socket; driving {rate} jobs/s over the socket "
              f"and {rate} over MQTT ({args.load:.0%} in all) for {args.minutes} min", flush=True)
        rows = []
        started = time.time()
        for minute in range(1, args.minutes + 1):
            results = {}
            threads = [threading.Thread(target=lambda v=v: results.__setitem__(
                v, bench(args, v, rate, 60, sock, mqtt_url, args.input))) for v in ("socket", "mqtt")]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            sample = proc_sample(daemon.pid)
            row = {"minute": minute, **sample}
            for via in ("socket", "mqtt"):
                r = results[via]
                row[via] = r if "error" in r else {k: r[k] for k in ("jobs_per_s", "p50_ms", "p99_ms", "errors")}
            rows.append(row)
            print(json.dumps(row), flush=True)
            if daemon.poll() is not None:
                print("the daemon exited", flush=True)
                break
        verdict = judge(rows)
        table = render(rows, cap, rate, args, time.time() - started, verdict)
        out = ROOT / "target" / "soak" / "soak.md"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(table)
        if args.out:
            Path(args.out).write_text(table)
        print(table)
        sys.exit(0 if verdict["ok"] else 1)
    finally:
        daemon.terminate()
        daemon.wait(timeout=30)
        broker.terminate()


def judge(rows):
    warm = rows[:WARMUP_MINUTES] or rows
    after = rows[WARMUP_MINUTES:]
    bound = {"rss_mib": max(r["rss_mib"] for r in warm) + RSS_GROWTH_MIB,
             "fds": max(r["fds"] for r in warm), "threads": max(r["threads"] for r in warm)}
    over = [f"minute {r['minute']}: {k} {r[k]} > {bound[k]}" for r in after for k in bound if r[k] > bound[k]]
    errors = sum(r[v].get("errors", 1) if "error" not in r[v] else 1 for r in rows for v in ("socket", "mqtt"))
    return {"ok": not over and errors == 0, "over": over, "bound": bound, "errors": errors}


def render(rows, cap, rate, args, seconds, verdict):
    lines = [
        f"Soak: model `{args.model}`, {len(rows)} minutes ({seconds / 60:.1f} min wall), capacity {cap:.0f} jobs/s "
        f"over the socket, driven at {rate} jobs/s over the socket and {rate} over MQTT "
        f"({args.load:.0%} of capacity in all).",
        "",
        "| minute | RSS MiB | fds | threads | socket jobs/s | socket p50 ms | socket p99 ms | MQTT jobs/s | "
        "MQTT p50 ms | MQTT p99 ms | errors |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        s, m = r["socket"], r["mqtt"]
        cell = lambda d, k: f"{d[k]:.2f}" if k in d else "—"  # noqa: E731
        errors = sum(d.get("errors", 0) for d in (s, m)) + sum(1 for d in (s, m) if "error" in d)
        lines.append(f"| {r['minute']} | {r['rss_mib']} | {r['fds']} | {r['threads']} | {cell(s, 'jobs_per_s')} | "
                     f"{cell(s, 'p50_ms')} | {cell(s, 'p99_ms')} | {cell(m, 'jobs_per_s')} | {cell(m, 'p50_ms')} | "
                     f"{cell(m, 'p99_ms')} | {errors} |")
    b = verdict["bound"]
    lines += ["", f"Bounds after the {WARMUP_MINUTES}-minute warm-up: RSS ≤ {b['rss_mib']} MiB, fds ≤ {b['fds']}, "
              f"threads ≤ {b['threads']}. Verdict: {'held' if verdict['ok'] else 'FAILED'}"
              + (f" ({'; '.join(verdict['over'])})" if verdict["over"] else "")
              + f"; {verdict['errors']} errors.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
