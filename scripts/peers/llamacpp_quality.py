#!/usr/bin/env python3
"""The llama.cpp peer for scripts/perplexity.py: the same quality measures
on the GGUF the ONNX variants are converted from, run by llama.cpp
(llama-cpp-python, built on this machine; see llamacpp_llm.py): perplexity on
the same chapters of Genesis (each chapter scored alone, every token but the
first), and greedy agreement with the exact reference on the same prompts
(models/fetched/smollm2/expected.json; chat rendered with the model's
template as inferd renders it, the same prompt tokens checked).

    /tmp/llama/bin/python scripts/peers/llamacpp_quality.py [CHAPTERS] [THREADS]

Prints one Markdown row and one JSON line.
"""
import json
import math
import sys
import time
from pathlib import Path

import jinja2
import numpy as np
from llama_cpp import Llama
from llm_report import agreement

ROOT = Path(__file__).resolve().parent.parent.parent
SMOL = ROOT / "models" / "fetched" / "smollm2"


def render(case, template):
    """The case's prompt; a chat through the model's own Jinja template (chat_template.jinja, as inferd renders it)."""
    if "prompt" in case:
        return case["prompt"]
    return template.render(messages=case["chat"], add_generation_prompt=True)


def main():
    chapters = int(sys.argv[1]) if len(sys.argv) > 1 else 50
    threads = int(sys.argv[2]) if len(sys.argv) > 2 else 2
    text = json.loads((ROOT / ".cache" / "perplexity" / "genesis.json").read_text())[:chapters]
    llm = Llama(model_path=str(SMOL / "SmolLM2-135M-Instruct.Q4_1.gguf"), n_ctx=4096, n_batch=512,
                n_threads=threads, n_threads_batch=threads, logits_all=True, verbose=False)
    t0 = time.perf_counter()
    total, count = 0.0, 0
    for chapter in text:
        ids = llm.tokenize(chapter.encode(), add_bos=False, special=False)
        llm.reset()
        llm.eval(ids)
        logits = np.asarray(llm.scores[: len(ids)], dtype=np.float64)
        top = logits.max(axis=1, keepdims=True)
        logp = logits - (top + np.log(np.exp(logits - top).sum(axis=1, keepdims=True)))
        total += float(sum(logp[j, ids[j + 1]] for j in range(len(ids) - 1)))
        count += len(ids) - 1
    ppl = math.exp(-total / count)

    reference = json.loads((SMOL / "expected.json").read_text())
    template = jinja2.Environment().from_string((SMOL / "chat_template.jinja").read_text())
    agreed = want_total = 0
    for case in reference["cases"]:
        ids = llm.tokenize(render(case, template).encode(), add_bos=False, special=True)
        if len(ids) != case["prompt_tokens"]:
            raise SystemExit(f"llama.cpp made {len(ids)} prompt tokens, the reference {case['prompt_tokens']}")
        llm.reset()
        got = []
        for t in llm.generate(ids, top_k=1, temp=0.0, reset=True):
            got.append(t)
            if len(got) >= len(case["tokens"]) or t == llm.token_eos():
                break
        agreed += agreement(got, case["tokens"])
        want_total += len(case["tokens"])
    seconds = time.perf_counter() - t0
    print(f"| llama.cpp (Q4_1 GGUF) | {count} | {ppl:.4f} | | {agreed} / {want_total} | {seconds:.0f} |")
    print(json.dumps({"variant": "llama.cpp", "tokens": count, "perplexity": ppl, "agreement": agreed,
                      "agreement_of": want_total}))


if __name__ == "__main__":
    main()
