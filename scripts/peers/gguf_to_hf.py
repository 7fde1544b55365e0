#!/usr/bin/env python3
"""The SmolLM2 GGUF as a Hugging Face llama folder (config.json,
model.safetensors, tokenizer), for onnxruntime-genai's model builder, whose
own GGUF reader cannot read quantised GGUFs:

    gguf_to_hf.py models/fetched/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf OUT
    python -m onnxruntime_genai.models.builder -i OUT -o OUT/int4 -p int4 -e cpu

Every tensor is dequantised to f32 (gguf-py) and Q/K rows are put back in
Hugging Face's order (llama.cpp permutes them for its rotary embedding), so
the builder re-quantises the same values the GGUF holds. Needs numpy, gguf,
safetensors (and the converter, for the tokenizer).
"""
import json
import sys
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import gguf_to_onnx as conv  # noqa: E402


def main():
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    out = Path(sys.argv[2])
    out.mkdir(parents=True, exist_ok=True)
    reader, m, cfg = conv.open_llama(sys.argv[1])
    t = {x.name: x for x in reader.tensors}

    def w(name):
        return conv.dequantize(t[name])

    tensors = {"model.embed_tokens.weight": w("token_embd.weight"), "model.norm.weight": w("output_norm.weight")}
    for i in range(cfg.layers):
        p, h = f"blk.{i}.", f"model.layers.{i}."
        q, k = w(p + "attn_q.weight"), w(p + "attn_k.weight")
        tensors[h + "self_attn.q_proj.weight"] = q[conv.unpermute_rows(q.shape[0], cfg.heads)]
        tensors[h + "self_attn.k_proj.weight"] = k[conv.unpermute_rows(k.shape[0], cfg.kv_heads)]
        tensors[h + "self_attn.v_proj.weight"] = w(p + "attn_v.weight")
        tensors[h + "self_attn.o_proj.weight"] = w(p + "attn_output.weight")
        tensors[h + "mlp.gate_proj.weight"] = w(p + "ffn_gate.weight")
        tensors[h + "mlp.up_proj.weight"] = w(p + "ffn_up.weight")
        tensors[h + "mlp.down_proj.weight"] = w(p + "ffn_down.weight")
        tensors[h + "input_layernorm.weight"] = w(p + "attn_norm.weight")
        tensors[h + "post_attention_layernorm.weight"] = w(p + "ffn_norm.weight")
    save_file({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in tensors.items()}, str(out / "model.safetensors"),
              metadata={"format": "pt"})
    bos, eos = int(m["tokenizer.ggml.bos_token_id"]), int(m["tokenizer.ggml.eos_token_id"])
    (out / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": cfg.hidden,
        "intermediate_size": cfg.ffn, "num_attention_heads": cfg.heads, "num_key_value_heads": cfg.kv_heads,
        "num_hidden_layers": cfg.layers, "head_dim": cfg.head_dim, "rms_norm_eps": cfg.eps, "rope_theta": cfg.rope_base,
        "vocab_size": cfg.vocab, "max_position_embeddings": cfg.context, "tie_word_embeddings": True,
        "hidden_act": "silu", "bos_token_id": bos, "eos_token_id": eos, "pad_token_id": eos, "torch_dtype": "float32",
        "attention_bias": False, "mlp_bias": False}, indent=1))
    (out / "generation_config.json").write_text(json.dumps({"bos_token_id": bos, "eos_token_id": [eos, 0]}))
    (out / "tokenizer.json").write_text(json.dumps(conv.tokenizer_json(m), ensure_ascii=False))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "add_bos_token": False, "add_prefix_space": False, "bos_token": "<|im_start|>", "eos_token": "<|im_end|>",
        "pad_token": "<|im_end|>", "unk_token": "<|endoftext|>", "model_max_length": cfg.context,
        "tokenizer_class": "GPT2Tokenizer", "clean_up_tokenization_spaces": False,
        "chat_template": conv.chat_template(m)}))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
