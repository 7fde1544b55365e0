#!/usr/bin/env python3
"""The transformers peer for scripts/bench_vlm.py: the fixture SmolVLM
(tests/fixtures/vlm/model/model, its safetensors) with transformers' own
SmolVLMProcessor at the same settings (scripts/make_vlm_fixture_model.py),
torch on the given threads, greedy, one stream; the same generated images.

    /tmp/hf/bin/python scripts/peers/transformers_vlm.py MODEL_DIR SIZES_JSON THREADS ROUNDS TOKENS

Prints one JSON line: the processor's median ms per image size (JPEG decode
included, as inferd's `pre_ms`), time to first token with a new 1280×960
image (decode, processor, prefill and one token), and decode tokens/s.
"""
import io
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import transformers
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench_vlm import QUESTION, photo  # noqa: E402
from make_vlm_fixture_model import fixture_processor  # noqa: E402
from transformers import SmolVLMForConditionalGeneration  # noqa: E402


def main():
    model_dir, sizes, threads, rounds, tokens = Path(sys.argv[1]), json.loads(sys.argv[2]), *map(int, sys.argv[3:6])
    torch.set_num_threads(threads)
    proc = fixture_processor(model_dir / "tokenizer.json")
    model = SmolVLMForConditionalGeneration.from_pretrained(model_dir / "model").eval()
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    text = proc.apply_chat_template(msgs, add_generation_prompt=True)
    seed = iter(range(1 << 20, 1 << 30))

    def inputs(jpeg):
        img = Image.open(io.BytesIO(jpeg)).convert("RGB")
        out = proc(text=text, images=[[img]], return_tensors="pt")
        out.pop("token_type_ids", None)
        return out

    pre = []
    for w, h in sizes:
        times = []
        for _ in range(rounds):
            jpeg = photo(w, h, next(seed))
            t0 = time.perf_counter()
            inputs(jpeg)
            times.append((time.perf_counter() - t0) * 1000)
        pre.append(statistics.median(times))
    ttft, rate = [], []
    with torch.no_grad():
        model.generate(**inputs(photo(320, 240, next(seed))), max_new_tokens=2, do_sample=False)  # warm up
        for _ in range(rounds):
            jpeg = photo(1280, 960, next(seed))
            t0 = time.perf_counter()
            x = inputs(jpeg)
            t1 = time.perf_counter()
            model.generate(**x, max_new_tokens=1, do_sample=False)
            t2 = time.perf_counter()
            model.generate(**x, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
            t3 = time.perf_counter()
            ttft.append((t2 - t0) * 1000)  # the image processor and one token
            rate.append((tokens - 1) / max((t3 - t2) - (t2 - t1), 1e-9))  # N tokens against one
    print(json.dumps({"version": transformers.__version__, "torch": torch.__version__, "pre_ms": pre,
                      "ttft_ms": statistics.median(ttft), "decode_tok_s": statistics.median(rate)}))


if __name__ == "__main__":
    main()
