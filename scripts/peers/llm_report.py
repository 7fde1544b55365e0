"""What the two language-model peers (genai_llm.py, llamacpp_llm.py) share,
standard library only (each runs in its own Python environment): SmolLM2's
chat prompt and the one JSON line they print for scripts/bench_llm.py."""
import json
from pathlib import Path

SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


def chat(question):
    """The ChatML text SmolLM2's template makes of one user question."""
    return f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"


def row(prompt_tokens, tokens, start, first, end):
    """One timed answer: prompt in at `start`, first token at `first`, last at `end`."""
    return {"prompt_tokens": prompt_tokens, "tokens": tokens, "ttft_ms": (first - start) * 1000,
            "decode_tok_s": (tokens - 1) / (end - first)}


def report(rows):
    """Prints the averages over `rows` and this process's RSS as one JSON line."""
    rss = next(int(line.split()[1]) / 1024 for line in Path("/proc/self/status").read_text().splitlines()
               if line.startswith("VmRSS:"))
    ttft = sum(r["ttft_ms"] for r in rows) / len(rows)
    print(json.dumps({"ttft_ms": ttft,
                      "prefill_tok_s": sum(r["prompt_tokens"] for r in rows) / len(rows) / (ttft / 1000),
                      "decode_tok_s": sum(r["decode_tok_s"] for r in rows) / len(rows), "rss_mib": rss,
                      "tokens": [r["tokens"] for r in rows]}))


def agreement(got, want):
    """Tokens of `got` equal to `want` before the first difference."""
    same = 0
    for a, b in zip(got, want):
        if a != b:
            break
        same += 1
    return same
