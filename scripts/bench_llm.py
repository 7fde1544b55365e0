#!/usr/bin/env python3
"""Measures text generation through the daemon, as a client sees it: time to
first token (prefill), prefill and decode tokens/s, and the daemon's RSS, for
1 and 4 concurrent streams, on each variant of a model.

    scripts/setup.sh && cargo build --release --locked
    python3 scripts/bench_llm.py [--model smollm2] [--variants int4-fast,int4,fp32] [--tokens 128] \
        [--genai-python /tmp/genai/bin/python]

With --genai-python (a Python with onnxruntime-genai, see scripts/peers/genai_llm.py)
the same ONNX files also run under onnxruntime-genai, one stream, same threads;
with --genai-builder too (that Python also needs torch, transformers, onnx_ir,
safetensors and gguf) onnxruntime-genai's model builder makes its own int4 and fp32
graphs from the same weights (the GGUF dequantised into a Hugging Face folder by
scripts/peers/gguf_to_hf.py; kept in .cache/genai-builder/) and genai runs them;
with --llamacpp-python (a Python with llama-cpp-python built on this machine, see
scripts/peers/llamacpp_llm.py) llama.cpp runs the GGUF they were converted from.

It starts target/release/inferd on a private socket with the variant forced
(memory.budget_mb is left alone; the variant is pinned through a one-model
registry), streams chat completions with temperature 0 and reads the server-sent
events. Decode tokens/s counts the tokens after the first over the time after
the first; with 4 streams it is their sum over the wall time.
"""
import argparse
import json
import os
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from socket_client import UnixConnection, events

ROOT = Path(__file__).resolve().parent.parent
BIN = ROOT / "target" / "release" / "inferd"
PROMPTS = [
    "Write a short story about a robot that learns to paint.",
    "Explain how a refrigerator works, step by step.",
    "Describe a busy train station in the morning.",
    "Write a letter to a friend about a trip to the mountains.",
]


def stream(sock, model, prompt, max_tokens, out):
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": prompt}], "temperature": 0,
                       "max_tokens": max_tokens, "stream": True})
    c = UnixConnection(sock)
    t0 = time.perf_counter()
    c.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
    first = None
    for at, event in events(c.getresponse()):
        if event["choices"][0]["delta"].get("content"):
            first = first or at
    end = time.perf_counter()
    out.append({"start": t0, "first": first or end, "end": end})


def usage(sock, model, prompt, max_tokens):
    """Prompt and completion tokens of the same request (greedy: the same tokens)."""
    c = UnixConnection(sock)
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": prompt}], "temperature": 0,
                       "max_tokens": max_tokens})
    c.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
    answer = json.loads(c.getresponse().read())
    if "usage" not in answer:
        raise SystemExit(f"{model}: {answer}")
    u = answer["usage"]
    return u["prompt_tokens"], u["completion_tokens"]


def rss_mib(pid):
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def run_variant(model, variant, max_tokens, threads):
    registry = json.loads((ROOT / "models.json").read_text())
    spec = next(m for m in registry["models"] if m["name"] == model)
    spec["variants"] = [v for v in spec["variants"] if v["name"] == variant]
    for v in spec["variants"]:
        v["file"] = str(ROOT / v["file"])
    spec["generation"]["tokenizer"] = str(ROOT / spec["generation"]["tokenizer"])
    if isinstance(spec["generation"].get("chat_template"), str):
        spec["generation"]["chat_template"] = str(ROOT / spec["generation"]["chat_template"])
    work = Path(tempfile.mkdtemp(prefix="bench-llm-"))
    (work / "models.json").write_text(json.dumps({"models": [spec]}))
    sock = str(work / "inferd.sock")
    env = dict(os.environ, INFERD_SOCKET__PATH=sock, INFERD_MODELS=str(work / "models.json"),
               INFERD_MODELS_OUTSIDE="true", INFERD_MEMORY__STATE_DIR=str(work / "state"), INFERD_LOG__LEVEL="warn",
               INFERD_RUNTIME__INTRA_THREADS=str(threads))
    daemon = subprocess.Popen([str(BIN), "serve"], env=env, stderr=subprocess.DEVNULL)
    try:
        for _ in range(300):
            if os.path.exists(sock):
                break
            time.sleep(0.02)
        usage(sock, model, "Hi", 4)  # load and warm up
        counts = [usage(sock, model, p, max_tokens) for p in PROMPTS]
        rows = []
        for streams in (1, 4):
            out, ts = [], []
            for i in range(streams):
                ts.append(threading.Thread(target=stream, args=(sock, model, PROMPTS[i], max_tokens, out)))
            t0 = time.perf_counter()
            for t in ts:
                t.start()
            for t in ts:
                t.join()
            wall = time.perf_counter() - t0
            done = sorted(out, key=lambda o: o["start"])
            prompt_tokens = sum(counts[i][0] for i in range(streams))
            completion = sum(counts[i][1] for i in range(streams))
            ttft = sum(o["first"] - o["start"] for o in done) / streams
            decode_time = max(o["end"] for o in done) - min(o["first"] for o in done)
            rows.append({
                "variant": variant, "streams": streams, "prompt_tokens": prompt_tokens, "completion_tokens": completion,
                "ttft_ms": ttft * 1000, "prefill_tok_s": (prompt_tokens / streams) / ttft,
                "decode_tok_s": (completion - streams) / decode_time, "wall_s": wall,
            })
        rss = rss_mib(daemon.pid)
        for r in rows:
            r["rss_mib"] = rss
        return rows
    finally:
        daemon.terminate()
        daemon.wait()


def genai(args, variant):
    """One row: onnxruntime-genai on `variant` (inferd's file, or builder-PRECISION)."""
    out = subprocess.run([args.genai_python, str(ROOT / "scripts/peers/genai_llm.py"), variant,
                          str(args.tokens), json.dumps(PROMPTS[:1])], capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"onnxruntime-genai failed: {out.stderr}")
    r = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"| onnxruntime-genai | {variant} | 1 | {r['ttft_ms']:.0f} | {r['prefill_tok_s']:.0f} | "
          f"{r['decode_tok_s']:.1f} | {r['rss_mib']:.0f} |", flush=True)


def build_with_genai_builder(python, precision):
    """onnxruntime-genai's model builder on the GGUF's weights (once per clone): .cache/genai-builder/PRECISION."""
    cache = ROOT / ".cache" / "genai-builder"
    if (cache / precision / "genai_config.json").exists():
        return
    hf = cache / "hf"
    if not (hf / "model.safetensors").exists():
        subprocess.run([python, str(ROOT / "scripts/peers/gguf_to_hf.py"),
                        str(ROOT / "models/fetched/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"), str(hf)], check=True,
                       stdout=subprocess.DEVNULL)
    subprocess.run([python, "-m", "onnxruntime_genai.models.builder", "-i", str(hf), "-o", str(cache / precision),
                    "-p", precision, "-e", "cpu", "-c", str(cache / "work")], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--variants", default="int4-fast,int4,fp32")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--genai-python", help="a Python with onnxruntime-genai: run it as the peer")
    ap.add_argument("--llamacpp-python", help="a Python with llama-cpp-python: run llama.cpp on the GGUF as the peer")
    ap.add_argument("--genai-builder", action="store_true",
                    help="with --genai-python: also onnxruntime-genai on its model builder's int4 and fp32 graphs")
    args = ap.parse_args()
    print("| engine | variant | streams | time to first token ms | prefill tok/s | decode tok/s (all streams) | RSS MiB |")
    print("|---|---|---|---|---|---|---|")
    for variant in args.variants.split(","):
        for r in run_variant(args.model, variant, args.tokens, args.threads):
            print(f"| inferd | {r['variant']} | {r['streams']} | {r['ttft_ms']:.0f} | {r['prefill_tok_s']:.0f} | "
                  f"{r['decode_tok_s']:.1f} | {r['rss_mib']:.0f} |", flush=True)
        if args.genai_python:
            genai(args, variant)
    if args.genai_python and args.genai_builder:
        for precision in ("int4", "fp32"):
            build_with_genai_builder(args.genai_python, precision)
            genai(args, f"builder-{precision}")
    if args.llamacpp_python:
        out = subprocess.run([args.llamacpp_python, str(ROOT / "scripts/peers/llamacpp_llm.py"), str(args.tokens),
                              json.dumps(PROMPTS[:1]), str(args.threads)], capture_output=True, text=True)
        if out.returncode != 0:
            raise SystemExit(f"llama.cpp failed: {out.stderr}")
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"| llama.cpp | Q4_1 GGUF | 1 | {r['ttft_ms']:.0f} | {r['prefill_tok_s']:.0f} | "
              f"{r['decode_tok_s']:.1f} | {r['rss_mib']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
