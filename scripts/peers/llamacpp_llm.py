#!/usr/bin/env python3
"""The llama.cpp peer for scripts/bench_llm.py: the GGUF the ONNX variants are
converted from (models/fetched/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf, Q4_1
matrices and a Q8_0 embedding), run by llama.cpp through llama-cpp-python,
compiled on this machine with its native instruction set; the same chat
prompts (ChatML, SmolLM2's default system message), greedy, 2 threads, one
stream at a time (llama-cpp-python's Llama holds one sequence).

    python3 -m venv /tmp/llama && CMAKE_ARGS="-DGGML_NATIVE=ON" /tmp/llama/bin/pip install llama-cpp-python==0.3.16
    /tmp/llama/bin/python scripts/peers/llamacpp_llm.py MAX_TOKENS [PROMPTS_JSON] [THREADS]

Prints one JSON line: time to first token (prompt in, first token out, ms),
prefill and decode tokens/s, the process's RSS in MiB.
"""
import json
import sys
import time
from pathlib import Path

from llama_cpp import Llama
from llm_report import chat, report, row

ROOT = Path(__file__).resolve().parent.parent.parent
GGUF = ROOT / "models" / "fetched" / "smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"


def main():
    max_tokens = int(sys.argv[1])
    prompts = json.loads(sys.argv[2]) if len(sys.argv) > 2 else ["Write a short story about a robot that learns to paint."]
    threads = int(sys.argv[3]) if len(sys.argv) > 3 else 2
    llm = Llama(model_path=str(GGUF), n_ctx=2048, n_batch=512, n_threads=threads, n_threads_batch=threads,
                verbose=False)
    rows = []
    for i, q in enumerate(["Hi"] + prompts):  # the first one warms up
        ids = llm.tokenize(chat(q).encode(), add_bos=False, special=True)
        llm.reset()
        t0 = time.perf_counter()
        n, first = 0, None
        for _ in llm.generate(ids, top_k=1, temp=0.0, reset=True):
            n += 1
            first = first or time.perf_counter()
            if n >= max_tokens:
                break
        end = time.perf_counter()
        if i:
            rows.append(row(len(ids), n, t0, first, end))
    report(rows)


if __name__ == "__main__":
    main()
