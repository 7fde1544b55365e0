#!/usr/bin/env python3
"""Records what transformers' SmolVLM image processor and prompt expansion
make of six images, for tests/fixtures/vlm (the vision-language task's
processor is checked against it: src/pipeline/vision/processor.rs).

    python3 -m venv /tmp/hf && /tmp/hf/bin/pip install transformers==4.57.1 pillow==13.0.0 numpy
    /tmp/hf/bin/python scripts/make_vlm_fixtures.py tests/fixtures/vlm

The processor runs with SmolVLM's rules (longest edge first, then each side
up to a multiple of the tile, tiles in reading order and a global view, PIL's
Lanczos filter on 8-bit RGB, rescale by 1/255, normalise with mean and std
0.5) at a small scale so the fixture stays small: longest edge 192, tiles of
64 (SmolVLM-256M uses 2048 and 512; the arithmetic is the same). For each
image it writes the tiles stacked top to bottom as one PNG (their 8-bit
values: pixel_values is exactly (v / 255 - 0.5) / 0.5 of them, checked
below) and, in expected.json, the grid and the expanded prompt.
"""
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image
from transformers.models.smolvlm.image_processing_smolvlm import SmolVLMImageProcessor
import transformers.models.smolvlm as smolvlm


def prompt_functions():
    """transformers' own prompt expansion (processing_smolvlm.py), taken from its
    source: importing that module needs torch, which nothing else here does."""
    import ast
    src = (Path(smolvlm.__file__).parent / "processing_smolvlm.py").read_text()
    wanted = {"_prompt_split_image", "_prompt_single_image", "get_image_prompt_string"}
    tree = ast.parse(src)
    body = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name in wanted]
    assert {n.name for n in body} == wanted, "transformers' prompt functions moved"
    scope = {}
    exec(compile(ast.Module(body=body, type_ignores=[]), "processing_smolvlm.py", "exec"), scope)
    return scope["get_image_prompt_string"]


get_image_prompt_string = prompt_functions()

LONGEST, TILE, SEQ = 192, 64, 4


def picture(w, h, seed):
    """A smooth picture with edges (gradients, a disc, stripes): resampling shows on it."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    r = 127 + 120 * np.sin(x / max(w, 1) * 6.3 + seed)
    g = 255 * (y / max(h - 1, 1))
    disc = ((x - w * 0.6) ** 2 + (y - h * 0.4) ** 2) < (min(w, h) * 0.3) ** 2
    b = np.where(disc, 230, 40) + 20 * ((x.astype(int) // 3) % 2)
    img = np.stack([r, g, b], -1) + rng.normal(0, 6, (h, w, 3))
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")


CASES = [
    ("tiny", 17, 11),          # far below a tile: upscaled to the longest edge
    ("portrait", 90, 270),
    ("panorama", 400, 50),
    ("square", 64, 64),        # exactly one tile's size before the longest-edge rule
    ("large", 320, 240),       # larger than the longest edge
    ("odd", 151, 97),
]


def main():
    out = Path(sys.argv[1])
    (out / "images").mkdir(parents=True, exist_ok=True)
    proc = SmolVLMImageProcessor(size={"longest_edge": LONGEST}, max_image_size={"longest_edge": TILE},
                                 do_image_splitting=True, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    cases = []
    for i, (name, w, h) in enumerate(CASES):
        img = picture(w, h, i)
        img.save(out / "images" / f"{name}.png")
        got = proc(images=[[Image.open(out / "images" / f"{name}.png")]], return_tensors="np",
                   return_row_col_info=True)
        pv = got["pixel_values"][0]  # [tiles, 3, TILE, TILE]
        mask = got["pixel_attention_mask"][0]
        assert mask.all(), "one image per sample: no padding"
        u8 = np.rint((pv * 0.5 + 0.5) * 255).astype(np.uint8)
        back = ((u8.astype(np.float32) / 255 - 0.5) / 0.5).astype(np.float32)
        assert np.abs(back - pv).max() < 1e-6, "pixel_values are the 8-bit tiles, normalised"
        stacked = u8.transpose(0, 2, 3, 1).reshape(-1, TILE, 3)
        Image.fromarray(stacked, "RGB").save(out / f"{name}.tiles.png")
        rows, cols = int(got["rows"][0][0]), int(got["cols"][0][0])
        prompt = get_image_prompt_string(rows, cols, SEQ, "<fake_token_around_image>", "<image>", "<global-img>")
        cases.append({"image": f"images/{name}.png", "width": w, "height": h, "rows": rows, "cols": cols,
                      "tiles": int(pv.shape[0]), "tiles_png": f"{name}.tiles.png", "prompt": prompt})
        print(f"{name}: {w}x{h} -> {rows}x{cols} tiles + global ({pv.shape[0]} in all)")
    (out / "expected.json").write_text(json.dumps({
        "longest_edge": LONGEST, "tile": TILE, "image_seq_len": SEQ, "resample": "PIL LANCZOS (8-bit)",
        "image_mean": [0.5] * 3, "image_std": [0.5] * 3, "cases": cases}, indent=1) + "\n")


if __name__ == "__main__":
    main()
