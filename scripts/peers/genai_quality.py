#!/usr/bin/env python3
"""Greedy agreement of onnxruntime-genai with the exact reference, for the
quality columns of docs/BENCHMARKS.md: the prompts of
models/fetched/smollm2/expected.json (chats rendered with the model's own
template, the same prompt tokens checked), tokens before the first
difference, summed — on inferd's graphs or the model builder's
(VARIANT as scripts/peers/genai_llm.py takes it).

    /tmp/genai/bin/python scripts/peers/genai_quality.py builder-int4

Prints one JSON line.
"""
import json
import sys
from pathlib import Path

import jinja2
import onnxruntime_genai as og
from genai_llm import model_dir
from llm_report import agreement

ROOT = Path(__file__).resolve().parent.parent.parent
SMOL = ROOT / "models" / "fetched" / "smollm2"


def main():
    variant = sys.argv[1]
    model = og.Model(str(model_dir(variant)))
    tok = og.Tokenizer(model)
    template = jinja2.Environment().from_string((SMOL / "chat_template.jinja").read_text())
    reference = json.loads((SMOL / "expected.json").read_text())
    agreed = total = 0
    for case in reference["cases"]:
        text = case["prompt"] if "prompt" in case else template.render(messages=case["chat"],
                                                                         add_generation_prompt=True)
        ids = list(tok.encode(text))
        if len(ids) != case["prompt_tokens"]:
            raise SystemExit(f"genai made {len(ids)} prompt tokens, the reference {case['prompt_tokens']}")
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(ids) + len(case["tokens"]), do_sample=False)
        g = og.Generator(model, params)
        g.append_tokens(ids)
        got = []
        while not g.is_done() and len(got) < len(case["tokens"]):
            g.generate_next_token()
            got.append(int(g.get_next_tokens()[0]))
        agreed += agreement(got, case["tokens"])
        total += len(case["tokens"])
    print(json.dumps({"variant": variant, "agreement": agreed, "of": total}))


if __name__ == "__main__":
    main()
