#!/usr/bin/env python3
"""Hostile generation requests against a running daemon, with a short probe
chat to the same model all along (docs/RELIABILITY.md, "Hostile generation
requests"):

    scripts/hostile_generation.py prompt SOCKET PID [--model smollm2] [--words 4000]
    scripts/hostile_generation.py schemas SOCKET PID [--model smollm2] [--seconds 20]

`prompt` sends one long prompt (plain English words, about two tokens each for
SmolLM2's tokenizer) as a chat with max_tokens 1 and reports its time, the
daemon's resident memory (peak during, and after) and the probe's latency
before, during and after. `schemas` sends the reported hostile schemas in a
loop from two clients (`--rate` a second each) and reports how each was answered (and how fast), the
daemon's peak memory and the probe's latency before and during.
"""
import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from socket_client import UnixConnection  # noqa: E402


def rss_mib(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def chat(sock, model, text, max_tokens):
    c = UnixConnection(sock)
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": text}],
                       "max_tokens": max_tokens, "temperature": 0})
    t = time.perf_counter()
    c.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
    r = c.getresponse()
    answer = json.loads(r.read())
    return time.perf_counter() - t, r.status, answer


def chain(hops, any_of):
    defs = {}
    for i in range(hops):
        nxt = {"$ref": f"#/$defs/d{i + 1}"}
        defs[f"d{i}"] = {"anyOf": [nxt]} if any_of else nxt
    defs[f"d{hops}"] = {"type": "object"}
    return {"$defs": defs, "$ref": "#/$defs/d0"}


def hostile_schemas():
    deep = {"type": "integer"}
    for _ in range(5):
        deep = {"type": "array", "minItems": 64, "items": deep}
    nested = {"type": "object"}
    for _ in range(40):
        nested = {"anyOf": [nested]}
    return {
        "ref chain 3000": chain(3000, False),
        "anyOf chain 1500": chain(1500, True),
        "anyOf nested 40": nested,
        "arrays 5 deep minItems 64": {"type": "object", "properties": {"a": deep}, "required": ["a"]},
        "const 70 KB": {"type": "object", "properties": {"c": {"const": "x" * 70000}}},
        "name 5 KB": {"type": "object", "properties": {"n" * 5000: {"type": "string"}}},
    }


def schemas(args):
    probe = lambda: chat(args.socket, args.model, "Say hi.", 2)  # noqa: E731
    probe()
    before = [probe()[0] for _ in range(20)]
    rss_before = rss_mib(args.pid)
    peak = [rss_before]
    stop = threading.Event()
    seen = {}
    lock = threading.Lock()

    def attack():
        while not stop.is_set():
            for name, schema in hostile_schemas().items():
                c = UnixConnection(args.socket)
                body = json.dumps({"model": args.model, "prompt": "Hi", "max_tokens": 64,
                                   "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}})
                t = time.perf_counter()
                c.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
                r = c.getresponse()
                answer = json.loads(r.read())
                ms = (time.perf_counter() - t) * 1000
                with lock:
                    s = seen.setdefault(name, {"status": r.status, "n": 0, "max_ms": 0.0,
                                               "message": (answer.get("error") or {}).get("message", "")[:120]})
                    s["n"] += 1
                    s["max_ms"] = round(max(s["max_ms"], ms), 1)
                peak[0] = max(peak[0], rss_mib(args.pid))
                time.sleep(1 / args.rate)

    threads = [threading.Thread(target=attack) for _ in range(2)]
    for t in threads:
        t.start()
    during = []
    deadline = time.time() + args.seconds
    while time.time() < deadline:
        during.append(probe()[0])
    stop.set()
    for t in threads:
        t.join()
    print(json.dumps({
        "schemas": seen,
        "rss_mib": {"before": round(rss_before), "peak": round(peak[0])},
        "probe_ms_before": {"p50": round(statistics.median(before) * 1000, 1), "max": round(max(before) * 1000, 1)},
        "probe_ms_during": {"n": len(during), "p50": round(statistics.median(during) * 1000, 1),
                            "max": round(max(during) * 1000, 1)},
    }, indent=1))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["prompt", "schemas"])
    ap.add_argument("socket")
    ap.add_argument("pid", type=int)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--words", type=int, default=4000)
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--rate", type=float, default=10, help="hostile requests a second from each of the two clients")
    args = ap.parse_args()
    if args.mode == "schemas":
        return schemas(args)
    words = ("edge box camera gate barn sensor scale model memory token prompt chunk answer " * 1000).split()
    long_text = " ".join(words[: args.words])

    probe = lambda: chat(args.socket, args.model, "Say hi.", 2)  # noqa: E731
    probe()  # loads the model
    before = [probe()[0] for _ in range(10)]
    rss_before = rss_mib(args.pid)

    peak = [rss_before]
    done = threading.Event()
    result = {}

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], rss_mib(args.pid))
            time.sleep(0.05)

    def attack():
        result["long"] = chat(args.socket, args.model, long_text, 1)
        done.set()

    threading.Thread(target=sample, daemon=True).start()
    t = threading.Thread(target=attack)
    t.start()
    time.sleep(0.5)
    during = []
    while not done.is_set():
        during.append(probe()[0])
    t.join()
    # The worker drops a timed-out request at its next chunk: give it that long, then a probe.
    time.sleep(5.0)
    after_probe = probe()[0]
    rss_after = rss_mib(args.pid)
    secs, status, answer = result["long"]
    usage = answer.get("usage", {})
    print(json.dumps({
        "long_prompt": {"status": status, "seconds": round(secs, 2), "prompt_tokens": usage.get("prompt_tokens"),
                        "error": answer.get("error")},
        "rss_mib": {"before": round(rss_before), "peak": round(peak[0]), "after": round(rss_after)},
        "probe_ms_before": {"p50": round(statistics.median(before) * 1000), "max": round(max(before) * 1000)},
        "probe_ms_during": {"n": len(during), "p50": round(statistics.median(during) * 1000) if during else None,
                            "max": round(max(during) * 1000) if during else None},
        "probe_ms_after": round(after_probe * 1000),
    }, indent=1))


if __name__ == "__main__":
    main()
