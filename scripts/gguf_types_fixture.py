#!/usr/bin/env python3
"""Small llama GGUFs of every matrix type scripts/gguf_to_onnx.py reads, their
ONNX graphs, and the numpy reference's logits: what tests/gguf_types.rs runs.

    gguf_types_fixture.py OUT

For each of Q4_0, Q4_1, Q8_0 and F16 it writes OUT/TYPE/model.gguf — a 2-block
llama (hidden 64, 4 query heads sharing 2 key/value heads, MLP 128, vocabulary
96) with seeded random weights, every matrix of that type, the embedding Q8_0
(the table the fast head reads) — then OUT/TYPE/{fp32,int4,int4-fast}.onnx
written by gguf_to_onnx's own builders, and OUT/TYPE/reference.json: a prompt,
the logits of its last position and of two decoding steps after it (the greedy
tokens fed), from scripts/gguf_reference.py (numpy, the GGUF dequantised by
gguf-py, written apart from the converter). Needs numpy, onnx and gguf (the
converter's environment, .cache/convert-venv); a few seconds.
"""
import json
import sys
from pathlib import Path

import gguf
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gguf_reference  # noqa: E402
import gguf_to_onnx  # noqa: E402

Q = gguf.GGMLQuantizationType
LAYERS, HIDDEN, HEADS, KV_HEADS, FFN, VOCAB = 2, 64, 4, 2, 128, 96
PROMPT = [5, 17, 42, 8, 77, 3, 61, 20, 33]
STEPS = 2


def write_gguf(path, kind, rng):
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(LAYERS)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_context_length(256)
    w.add_vocab_size(VOCAB)

    def matrix(name, rows, cols, qtype):
        values = (rng.standard_normal((rows, cols)) / np.sqrt(cols)).astype(np.float32)
        if qtype == Q.F16:
            w.add_tensor(name, values.astype(np.float16))
        else:
            w.add_tensor(name, gguf.quants.quantize(values, qtype), raw_dtype=qtype)

    def vector(name, n):
        w.add_tensor(name, (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32))

    matrix("token_embd.weight", VOCAB, HIDDEN, Q.Q8_0)
    hd = HIDDEN // HEADS
    for i in range(LAYERS):
        p = f"blk.{i}."
        vector(p + "attn_norm.weight", HIDDEN)
        matrix(p + "attn_q.weight", HEADS * hd, HIDDEN, kind)
        matrix(p + "attn_k.weight", KV_HEADS * hd, HIDDEN, kind)
        matrix(p + "attn_v.weight", KV_HEADS * hd, HIDDEN, kind)
        matrix(p + "attn_output.weight", HIDDEN, HEADS * hd, kind)
        vector(p + "ffn_norm.weight", HIDDEN)
        matrix(p + "ffn_gate.weight", FFN, HIDDEN, kind)
        matrix(p + "ffn_up.weight", FFN, HIDDEN, kind)
        matrix(p + "ffn_down.weight", HIDDEN, FFN, kind)
    vector("output_norm.weight", HIDDEN)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def main():
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    out = Path(sys.argv[1])
    for n, kind in enumerate((Q.Q4_0, Q.Q4_1, Q.Q8_0, Q.F16)):
        folder = out / kind.name.lower()
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / "model.gguf"
        write_gguf(path, kind, np.random.default_rng(1000 + n))
        reader = gguf.GGUFReader(str(path))
        cfg = gguf_to_onnx.Config(gguf_to_onnx.meta(reader))
        graphs = {
            "fp32": gguf_to_onnx.build_standard(reader, cfg),
            "int4": gguf_to_onnx.build_fused(reader, cfg, 0),
            "int4-fast": gguf_to_onnx.build_fused(reader, cfg, 4, exact=gguf_to_onnx.FAST_EXACT),
        }
        for name, model in graphs.items():
            (folder / f"{name}.onnx").write_bytes(model.SerializeToString())
        ref = gguf_reference.Llama(str(path))
        cache, feed, logits, tokens = [], list(PROMPT), [], []
        for _ in range(1 + STEPS):
            last = ref.forward(np.array(feed), cache)
            logits.append([float(v) for v in last])
            feed = [int(np.argmax(last))]
            tokens.append(feed[0])
        (folder / "reference.json").write_text(json.dumps({
            "type": kind.name, "layers": LAYERS, "kv_heads": KV_HEADS, "head_dim": HIDDEN // HEADS,
            "prompt": PROMPT, "fed": tokens[:STEPS], "logits": logits}))
        print(f"wrote {folder}")


if __name__ == "__main__":
    main()
