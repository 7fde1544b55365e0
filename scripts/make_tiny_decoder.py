#!/usr/bin/env python3
"""Makes the tiny text-generation fixture: a GPT-2-style decoder with random
weights, exported to ONNX in the layout torch/optimum exports decoders with
(inputs input_ids, attention_mask, position_ids, past_key_values.{i}.key/value;
outputs logits, present.{i}.key/value), a byte-level BPE tokenizer.json
trained on a small text, and the tokens a reference loop *without* a KV cache
generates greedily (the whole sequence re-run through torch each step).

inferd's KV-cache loop must reproduce those tokens exactly (tests/generate.rs).

    python3 -m venv /tmp/venv-gen
    /tmp/venv-gen/bin/pip install torch==2.15.0 onnx==1.23.2 onnxscript onnxruntime==1.31.1 tokenizers==0.23.3 numpy
    /tmp/venv-gen/bin/python scripts/make_tiny_decoder.py tests/fixtures/generate

Prompts whose greedy path has a near-tie (top-2 logits within 1e-3) at any
step are skipped, so float rounding cannot flip a token.
"""

import json
import math
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

LAYERS, HEADS, HEAD_DIM, CONTEXT = 2, 4, 16, 128
EMBED = HEADS * HEAD_DIM
STEPS = 24

CORPUS = """The camera on the gate sees a red car. The sensor in the barn reads the
temperature every minute. An edge box runs small models next to the machines it
watches, and it answers in milliseconds. The operator checks the status with
systemctl and reads the journal. Models are loaded when the first job arrives
and unloaded when memory runs short. A receipt lists the store, the date, the
items and the total. The quick brown fox jumps over the lazy dog. Hello world!
User: what is the weather like today? Assistant: it is sunny and warm.
User: count to five. Assistant: one, two, three, four, five.
"""

PROMPTS = [
    "The camera on the gate",
    "An edge box runs",
    "Hello",
    "User: what is the weather like today?\nAssistant:",
    "The quick brown fox",
    "Models are loaded when",
]


class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.ln1 = torch.nn.LayerNorm(EMBED)
        self.qkv = torch.nn.Linear(EMBED, 3 * EMBED)
        self.proj = torch.nn.Linear(EMBED, EMBED)
        self.ln2 = torch.nn.LayerNorm(EMBED)
        self.fc = torch.nn.Linear(EMBED, 4 * EMBED)
        self.out = torch.nn.Linear(4 * EMBED, EMBED)

    def forward(self, x, past_k, past_v, mask):
        b, s, _ = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(EMBED, dim=-1)
        heads = lambda t: t.view(b, s, HEADS, HEAD_DIM).transpose(1, 2)  # noqa: E731
        q, k, v = heads(q), heads(k), heads(v)
        k = torch.cat([past_k, k], dim=2)
        v = torch.cat([past_v, v], dim=2)
        att = (q @ k.transpose(-1, -2)) / math.sqrt(HEAD_DIM) + mask
        y = torch.softmax(att, dim=-1) @ v
        y = y.transpose(1, 2).reshape(b, s, EMBED)
        x = x + self.proj(y)
        x = x + self.out(torch.nn.functional.gelu(self.fc(self.ln2(x))))
        return x, k, v


class Decoder(torch.nn.Module):
    def __init__(self, vocab):
        super().__init__()
        self.wte = torch.nn.Embedding(vocab, EMBED)
        self.wpe = torch.nn.Embedding(CONTEXT, EMBED)
        self.blocks = torch.nn.ModuleList(Block() for _ in range(LAYERS))
        self.ln = torch.nn.LayerNorm(EMBED)
        self.head = torch.nn.Linear(EMBED, vocab, bias=False)

    def forward(self, input_ids, attention_mask, position_ids, *past):
        s = input_ids.shape[1]
        total = attention_mask.shape[1]
        # Query i (at absolute position total - s + i) sees keys 0..=that position, where the mask is 1.
        q_pos = torch.arange(s).unsqueeze(1) + (total - s)
        k_pos = torch.arange(total).unsqueeze(0)
        allowed = (k_pos <= q_pos).unsqueeze(0).unsqueeze(0) & (attention_mask[:, None, None, :] > 0)
        mask = torch.where(allowed, 0.0, -1e9)
        x = self.wte(input_ids) + self.wpe(position_ids)
        presents = []
        for i, block in enumerate(self.blocks):
            x, k, v = block(x, past[2 * i], past[2 * i + 1], mask)
            presents += [k, v]
        return (self.head(self.ln(x)), *presents)


def empty_past(s=0):
    return [torch.zeros(1, HEADS, s, HEAD_DIM) for _ in range(2 * LAYERS)]


def full_logits(model, ids):
    """The reference: the whole sequence, no cache."""
    n = len(ids)
    t = torch.tensor([ids])
    with torch.no_grad():
        return model(t, torch.ones(1, n, dtype=torch.long), torch.arange(n).unsqueeze(0), *empty_past())[0][0, -1]


def main(out_dir: Path):
    out_dir.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([CORPUS], trainer)
    tok.save(str(out_dir / "tokenizer.json"))
    vocab = tok.get_vocab_size()
    eos = tok.token_to_id("<|endoftext|>")

    torch.manual_seed(7)
    model = Decoder(vocab).eval()
    names_in = ["input_ids", "attention_mask", "position_ids"]
    names_past, names_present = [], []
    for i in range(LAYERS):
        names_past += [f"past_key_values.{i}.key", f"past_key_values.{i}.value"]
        names_present += [f"present.{i}.key", f"present.{i}.value"]
    axes = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "total"},
            "position_ids": {0: "batch", 1: "sequence"}, "logits": {0: "batch", 1: "sequence"}}
    for n in names_past:
        axes[n] = {0: "batch", 2: "past"}
    for n in names_present:
        axes[n] = {0: "batch", 2: "total"}
    sample = (torch.tensor([[1, 2, 3]]), torch.ones(1, 5, dtype=torch.long), torch.tensor([[2, 3, 4]]), *empty_past(2))
    onnx_path = out_dir / "tiny-decoder.onnx"
    torch.onnx.export(model, sample, str(onnx_path), input_names=names_in + names_past,
                      output_names=["logits"] + names_present, dynamic_axes=axes, opset_version=17, dynamo=False)

    # The ONNX graph, run with a cache the way inferd runs it, must agree with the reference.
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    cases = []
    for prompt in PROMPTS:
        ids = tok.encode(prompt).ids
        seq, generated, tie = list(ids), [], False
        for _ in range(STEPS):
            logits = full_logits(model, seq)
            top2 = torch.topk(logits, 2).values
            if float(top2[0] - top2[1]) < 1e-3:
                tie = True
                break
            nxt = int(torch.argmax(logits))
            generated.append(nxt)
            seq.append(nxt)
            if nxt == eos:
                break
        if tie:
            print(f"skipped (near-tie): {prompt!r}")
            continue
        # Cross-check: the cached loop through ONNX Runtime.
        past = {n: np.zeros((1, HEADS, 0, HEAD_DIM), np.float32) for n in names_past}
        feed_ids, total, cached = list(ids), 0, []
        for _ in range(len(generated)):
            s = len(feed_ids)
            feeds = {"input_ids": np.array([feed_ids], np.int64),
                     "attention_mask": np.ones((1, total + s), np.int64),
                     "position_ids": np.arange(total, total + s, dtype=np.int64)[None], **past}
            outs = session.run(None, feeds)
            nxt = int(np.argmax(outs[0][0, -1]))
            cached.append(nxt)
            past = dict(zip(names_past, outs[1:]))
            total += s
            feed_ids = [nxt]
        assert cached == generated, f"{prompt!r}: cached {cached} != reference {generated}"
        cases.append({"prompt": prompt, "prompt_tokens": ids, "tokens": generated, "text": tok.decode(generated)})
    expected = {"model": "tiny-decoder.onnx", "eos_token_id": eos, "vocab": vocab, "context_length": CONTEXT,
                "layers": LAYERS, "heads": HEADS, "head_dim": HEAD_DIM, "greedy": cases}
    (out_dir / "expected.json").write_text(json.dumps(expected, indent=1) + "\n")
    print(f"{len(cases)} prompts, {onnx_path.stat().st_size} bytes of ONNX, vocab {vocab}")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "tests/fixtures/generate"))
