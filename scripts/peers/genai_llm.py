#!/usr/bin/env python3
"""The onnxruntime-genai peer for scripts/bench_llm.py: the same ONNX file
inferd runs (models/fetched/smollm2/{fp32,int4,int4-fast}.onnx), the same tokenizer,
the same chat prompts, greedy, 2 intra-op threads; one stream at a time.
VARIANT `builder-int4` / `builder-fp32` runs instead the graph onnxruntime-genai's
own model builder made from the same weights (.cache/genai-builder/, made by
`scripts/bench_llm.py --genai-builder`), with its own genai_config.json.

    python3 -m venv /tmp/genai && /tmp/genai/bin/pip install onnxruntime-genai==0.18.0
    /tmp/genai/bin/python scripts/peers/genai_llm.py VARIANT MAX_TOKENS

Prints one JSON line: time to first token (prompt in, first token out, ms),
prefill and decode tokens/s, the process's RSS in MiB.
"""
import json
import sys
import tempfile
import time
from pathlib import Path

import onnxruntime_genai as og
from llm_report import chat, report, row

ROOT = Path(__file__).resolve().parent.parent.parent
SMOL = ROOT / "models" / "fetched" / "smollm2"


def builder_dir(precision):
    """The builder's folder with the same thread count as every engine here (2)."""
    src = ROOT / ".cache" / "genai-builder" / precision
    d = Path(tempfile.mkdtemp(prefix="genai-builder-"))
    for f in src.iterdir():
        if f.name != "genai_config.json":
            (d / f.name).symlink_to(f)
    config = json.loads((src / "genai_config.json").read_text())
    config["model"]["decoder"]["session_options"]["intra_op_num_threads"] = 2
    (d / "genai_config.json").write_text(json.dumps(config))
    return d


def model_dir(variant):
    if variant.startswith("builder-"):
        return builder_dir(variant.removeprefix("builder-"))
    d = Path(tempfile.mkdtemp(prefix="genai-"))
    (d / f"{variant}.onnx").symlink_to(SMOL / f"{variant}.onnx")
    (d / "tokenizer.json").symlink_to(SMOL / "tokenizer.json")
    (d / "tokenizer_config.json").write_text(json.dumps({
        "add_bos_token": False, "add_prefix_space": False, "bos_token": "<|im_start|>", "eos_token": "<|im_end|>",
        "pad_token": "<|im_end|>", "unk_token": "<|endoftext|>", "model_max_length": 8192,
        "tokenizer_class": "GPT2Tokenizer", "clean_up_tokenization_spaces": False}))
    names = {"input_ids": "input_ids", "attention_mask": "attention_mask", "position_ids": "position_ids",
             "past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"}
    # The fused graphs (int4, int4-fast) take no position ids and update the cache in place, as the
    # model builder's graphs do: genai shares one buffer between past and present for them.
    fused = variant != "fp32"
    if fused:
        del names["position_ids"]
    (d / "genai_config.json").write_text(json.dumps({
        "model": {"bos_token_id": 1, "context_length": 8192, "eos_token_id": [2, 0], "pad_token_id": 2,
                  "type": "llama", "vocab_size": 49152,
                  "decoder": {"session_options": {"log_id": "genai", "intra_op_num_threads": 2, "provider_options": []},
                              "filename": f"{variant}.onnx", "head_size": 64, "hidden_size": 576,
                              "num_attention_heads": 9, "num_hidden_layers": 30, "num_key_value_heads": 3,
                              "inputs": names,
                              "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                                          "present_value_names": "present.%d.value"}}},
        "search": {"do_sample": False, "max_length": 8192, "num_beams": 1, "past_present_share_buffer": fused}}))
    return d


def main():
    variant, max_tokens = sys.argv[1], int(sys.argv[2])
    prompts = json.loads(sys.argv[3]) if len(sys.argv) > 3 else ["Write a short story about a robot that learns to paint."]
    model = og.Model(str(model_dir(variant)))
    tok = og.Tokenizer(model)
    rows = []
    for i, q in enumerate(["Hi"] + prompts):  # the first one warms up
        ids = tok.encode(chat(q))
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(ids) + max_tokens, do_sample=False)
        g = og.Generator(model, params)
        t0 = time.perf_counter()
        g.append_tokens(ids)
        n, first = 0, None
        while not g.is_done():
            g.generate_next_token()
            n += 1
            first = first or time.perf_counter()
        end = time.perf_counter()
        if i:
            rows.append(row(len(ids), n, t0, first, end))
    report(rows)


if __name__ == "__main__":
    main()
