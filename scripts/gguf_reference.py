#!/usr/bin/env python3
"""The reference for inferd's SmolLM2 graphs: a llama forward pass in numpy
on the GGUF's dequantised weights, written apart from scripts/gguf_to_onnx.py
(it shares none of its code): the GGUF's own Q/K row order with llama.cpp's
RoPE (adjacent pairs rotate), grouped-query attention, RMSNorm, SwiGLU, the
output head tied to the embeddings. It generates greedily from each prompt
below and writes the prompt and generated token ids to expected.json;
tests/generate.rs checks that inferd generates exactly those ids.

Prompts whose greedy path has a near-tie (top-2 logits within 1e-4) are
marked, so a rounding difference there is told apart from a wrong graph.

    scripts/gguf_reference.py MODEL.gguf TOKENIZER.json OUT.json
"""

import json
import sys

import gguf
import numpy as np
from tokenizers import Tokenizer

STEPS = 24
LONG = ("An edge box sits next to the machines it watches: a camera on a gate, a sensor in a barn, a scale at "
        "a loading dock. It runs small models on what they send and answers in milliseconds, without a round "
        "trip to a data centre. ") * 9

PROMPTS = [
    {"chat": [{"role": "user", "content": "What is the capital of France?"}]},
    {"chat": [{"role": "system", "content": "You answer in one short sentence."},
              {"role": "user", "content": "Why is the sky blue?"}]},
    {"chat": [{"role": "user", "content": "Name three colours of the rainbow."}]},
    {"chat": [{"role": "user", "content": "Summarise in one sentence: " + LONG}]},
    {"prompt": "The capital of France is"},
    {"prompt": "def fibonacci(n):"},
    {"prompt": "Once upon a time, in a small village,"},
    {"prompt": LONG + "In short, an edge box"},
]


def chatml(messages, default_system):
    out = ""
    if messages[0]["role"] != "system":
        out += f"<|im_start|>system\n{default_system}<|im_end|>\n"
    for m in messages:
        out += f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n"
    return out + "<|im_start|>assistant\n"


class Llama:
    def __init__(self, path):
        r = gguf.GGUFReader(path)
        f = {k: v.contents() for k, v in r.fields.items() if not k.startswith("GGUF.")}
        self.meta = f
        self.w = {t.name: np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
                  for t in r.tensors}
        self.n_layer = int(f["llama.block_count"])
        self.n_head = int(f["llama.attention.head_count"])
        self.n_kv = int(f["llama.attention.head_count_kv"])
        self.dim = int(f["llama.embedding_length"])
        self.hd = self.dim // self.n_head
        self.eps = float(f["llama.attention.layer_norm_rms_epsilon"])
        self.theta = float(f["llama.rope.freq_base"])

    def norm(self, x, name):
        return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + self.eps) * self.w[name]

    def rope(self, x, pos):
        # x: [tokens, heads, hd]; llama.cpp's normal mode rotates pairs (2i, 2i + 1) by pos * theta^(-2i/hd).
        i = np.arange(self.hd // 2, dtype=np.float64)
        ang = pos[:, None].astype(np.float64) * self.theta ** (-2 * i / self.hd)
        c, s = np.cos(ang)[:, None, :].astype(np.float32), np.sin(ang)[:, None, :].astype(np.float32)
        a, b = x[..., 0::2], x[..., 1::2]
        out = np.empty_like(x)
        out[..., 0::2] = a * c - b * s
        out[..., 1::2] = a * s + b * c
        return out

    def forward(self, ids, cache):
        """Logits of the last of `ids`, appending their keys and values to `cache`."""
        start = cache[0][0].shape[0] if cache else 0
        pos = np.arange(start, start + len(ids))
        x = self.w["token_embd.weight"][ids]
        rep = self.n_head // self.n_kv
        for layer in range(self.n_layer):
            p = f"blk.{layer}."
            y = self.norm(x, p + "attn_norm.weight")
            q = self.rope((y @ self.w[p + "attn_q.weight"].T).reshape(len(ids), self.n_head, self.hd), pos)
            k = self.rope((y @ self.w[p + "attn_k.weight"].T).reshape(len(ids), self.n_kv, self.hd), pos)
            v = (y @ self.w[p + "attn_v.weight"].T).reshape(len(ids), self.n_kv, self.hd)
            if len(cache) <= layer:
                cache.append((np.zeros((0, self.n_kv, self.hd), np.float32),) * 2)
            k = np.concatenate([cache[layer][0], k])
            v = np.concatenate([cache[layer][1], v])
            cache[layer] = (k, v)
            out = np.empty((len(ids), self.n_head, self.hd), np.float32)
            for h in range(self.n_head):
                s = q[:, h] @ k[:, h // rep].T / np.sqrt(self.hd)
                s = np.where(np.arange(len(k))[None, :] <= pos[:, None], s, -np.inf)
                e = np.exp(s - s.max(axis=-1, keepdims=True))
                out[:, h] = (e / e.sum(axis=-1, keepdims=True)) @ v[:, h // rep]
            x = x + out.reshape(len(ids), self.dim) @ self.w[p + "attn_output.weight"].T
            y = self.norm(x, p + "ffn_norm.weight")
            gate = y @ self.w[p + "ffn_gate.weight"].T
            x = x + ((gate / (1 + np.exp(-gate))) * (y @ self.w[p + "ffn_up.weight"].T)) @ self.w[p + "ffn_down.weight"].T
        return self.norm(x[-1], "output_norm.weight") @ self.w["token_embd.weight"].T


def main():
    if len(sys.argv) != 4:
        raise SystemExit(__doc__)
    model, tok = Llama(sys.argv[1]), Tokenizer.from_file(sys.argv[2])
    eos = {model.meta["tokenizer.ggml.eos_token_id"]}
    default_system = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    cases = []
    for p in PROMPTS:
        text = chatml(p["chat"], default_system) if "chat" in p else p["prompt"]
        ids = tok.encode(text, add_special_tokens=False).ids
        cache, out, tie = [], [], False
        logits = model.forward(np.array(ids), cache)
        for _ in range(STEPS):
            top = np.sort(logits)[-2:]
            tie |= bool(top[1] - top[0] < 1e-4)
            nxt = int(np.argmax(logits))
            if nxt in eos:
                break
            out.append(nxt)
            logits = model.forward(np.array([nxt]), cache)
        case = dict(p, prompt_tokens=len(ids), tokens=out, answer=tok.decode(out), near_tie=tie)
        print(f"{len(ids):4} prompt tokens -> {tok.decode(out)!r}{' (near tie)' if tie else ''}")
        cases.append(case)
    with open(sys.argv[3], "w") as f:
        json.dump({"steps": STEPS, "cases": cases}, f, indent=1, ensure_ascii=False)
        f.write("\n")


if __name__ == "__main__":
    main()
