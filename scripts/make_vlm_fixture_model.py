#!/usr/bin/env python3
"""The vision-language task's reference model: a tiny random-weight SmolVLM
built with transformers' own classes (SmolVLMForConditionalGeneration, 144k
parameters: a 2-layer SigLIP-style encoder on 64-pixel views of 16-pixel
patches, pixel shuffle by 2 -> 4 image tokens per view, a 2-layer llama
decoder, a 300-token byte-level BPE with SmolVLM's special tokens), its
processor at the scale of tests/fixtures/vlm (longest edge 192, tiles 64),
SmolVLM's chat template, and transformers' greedy tokens for the six fixture
images (one per message) and for a message with two of them; then exports the
three ONNX graphs with the names of the onnx-community SmolVLM exports that
transformers.js runs (vision_encoder.onnx, embed_tokens.onnx,
decoder_model_merged.onnx) and checks that ONNX Runtime, chaining them the way
inferd does, gives transformers' tokens for every case.

    python3 -m venv /tmp/hf && /tmp/hf/bin/pip install transformers==4.57.1 pillow==13.0.0 \
        torch==2.9.1 torchvision==0.24.1 num2words numpy onnx==1.23.2 onnxruntime==1.31.1
    /tmp/hf/bin/python scripts/make_vlm_fixture_model.py tests/fixtures/vlm/model

Writes tokenizer.json, model/ (config and safetensors weights), onnx/ (the
three graphs) and reference.json: per image the chat prompt, the
processor's input_ids, the pixel_values shape and the greedy tokens. torch
and transformers are needed only here, never by setup or tests.
"""
import json, sys
from pathlib import Path
import torch
from PIL import Image
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast, SmolVLMConfig, SmolVLMForConditionalGeneration
from transformers.models.smolvlm.image_processing_smolvlm import SmolVLMImageProcessor
from transformers.models.smolvlm.processing_smolvlm import SmolVLMProcessor
from transformers.models.smolvlm.video_processing_smolvlm import SmolVLMVideoProcessor

FIX = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "vlm"
PROBE = 997
CORPUS = ("A camera watches the gate. Is the gate open? The gate is closed. A red car waits. "
          "The receipt shows a total of seven euros forty. Describe the picture in one sentence. ") * 20
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<end_of_utterance>", "<fake_token_around_image>", "<image>",
           "<global-img>"] + [f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)]
TEMPLATE = ("<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}"
            "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
            "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
            "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n"
            "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}")


def fixture_processor(tokenizer_file):
    """transformers' SmolVLMProcessor at the fixture's scale (longest edge 192, tiles of 64, 4 tokens a view)."""
    fast = PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_file), eos_token="<end_of_utterance>",
                                   pad_token="<|endoftext|>", bos_token="<|im_start|>")
    fast.fake_image_token, fast.image_token, fast.global_image_token = "<fake_token_around_image>", "<image>", "<global-img>"
    fast.end_of_utterance_token = "<end_of_utterance>"
    ip = SmolVLMImageProcessor(size={"longest_edge": 192}, max_image_size={"longest_edge": 64},
                               image_mean=[0.5] * 3, image_std=[0.5] * 3)
    return SmolVLMProcessor(image_processor=ip, tokenizer=fast, video_processor=SmolVLMVideoProcessor(), image_seq_len=4,
                            chat_template=TEMPLATE)


def main(out):
    out.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([CORPUS], trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIAL,
                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tok.save(str(out / "tokenizer.json"))
    proc = fixture_processor(out / "tokenizer.json")
    fast = proc.tokenizer
    torch.manual_seed(0)
    cfg = SmolVLMConfig(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=64, patch_size=16),
        text_config=dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=len(fast),
                         max_position_embeddings=2048, rms_norm_eps=1e-5, rope_theta=10000.0,
                         pad_token_id=fast.pad_token_id, tie_word_embeddings=True),
        scale_factor=2, image_token_id=fast.convert_tokens_to_ids("<image>"), pad_token_id=fast.pad_token_id,
        tie_word_embeddings=True)
    model = SmolVLMForConditionalGeneration(cfg).eval()
    # Wider random weights than the training init, so that the tokens follow the image and the prompt.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.35)
    expected = json.loads((FIX / "expected.json").read_text())
    cases = [([c["image"]], "Is the gate open?") for c in expected["cases"]]
    # Two images in one message: each expands in place, in order.
    cases.append(([expected["cases"][1]["image"], expected["cases"][2]["image"]], "Which picture is wider?"))
    rows = []
    for images, question in cases:
        imgs = [Image.open(FIX / i).convert("RGB") for i in images]
        msgs = [{"role": "user", "content": [{"type": "image"} for _ in imgs] + [{"type": "text", "text": question}]}]
        text = proc.apply_chat_template(msgs, add_generation_prompt=True)
        inputs = proc(text=text, images=[imgs], return_tensors="pt")
        inputs.pop("token_type_ids", None)
        with torch.no_grad():
            gen = model.generate(**inputs, max_new_tokens=10, do_sample=False)
        new = gen[0, inputs["input_ids"].shape[1]:].tolist()
        flat = inputs["pixel_values"][0].flatten().double()
        rows.append({"images": images, "question": question, "prompt": text,
                     "input_ids": inputs["input_ids"][0].tolist(),
                     "pixel_values_shape": list(inputs["pixel_values"].shape),
                     # Every PROBE-th value of pixel_values[0] (views, 3, tile, tile), and the sum of all.
                     "pixel_values_probe": flat[::PROBE].tolist(), "pixel_values_sum": float(flat.sum()),
                     "tokens": new})
        print(images, len(inputs["input_ids"][0]), list(inputs["pixel_values"].shape), new)
        rows[-1]["inputs"] = inputs
    model.save_pretrained(out / "model")
    print(sum(p.numel() for p in model.parameters()), "parameters")
    export(model, out / "onnx")
    eos = fast.convert_tokens_to_ids("<end_of_utterance>")
    for row in rows:
        inputs = row.pop("inputs")
        got = onnx_greedy(out / "onnx", inputs, cfg.image_token_id, eos, len(row["tokens"]))
        assert got == row["tokens"], (row["images"], got, row["tokens"])
    print("ONNX Runtime on the three graphs gives transformers' tokens for all", len(rows), "cases")
    (out / "reference.json").write_text(json.dumps({"chat_template": TEMPLATE, "image_seq_len": 4, "probe": PROBE,
                                                    "cases": rows}, indent=1) + "\n")
    (out / "chat_template.json").write_text(json.dumps({"chat_template": TEMPLATE}, indent=1) + "\n")
    write_models_json(out, sum(p.numel() for p in model.parameters()))


def write_models_json(out, parameters):
    """inferd's registry entry for the fixture, the graphs' sums filled in."""
    import hashlib
    sha = lambda f: hashlib.sha256((out / f).read_bytes()).hexdigest()
    part = lambda f: {"file": f, "sha256": sha(f)}
    entry = {
        "name": "tiny-vlm", "task": "vision-language",
        "description": "A tiny SmolVLM with random weights (scripts/make_vlm_fixture_model.py): the vision-language "
                       "task's test fixture, checked against transformers, not a model that sees",
        "generation": {"tokenizer": "tokenizer.json", "context_length": 2048, "eos_tokens": ["<end_of_utterance>"],
                       "max_tokens": 64, "parallel": 4, "chat_template": "chat_template.json",
                       "chat_stop": ["\nUser:"]},
        "vision": {"longest_edge": 192, "tile": 64, "image_seq_len": 4},
        "variants": [{"name": "fp32", "file": "onnx/decoder_model_merged.onnx", "sha256": sha("onnx/decoder_model_merged.onnx"),
                      "parts": {"vision": part("onnx/vision_encoder.onnx"), "embed": part("onnx/embed_tokens.onnx")},
                      "parameters": parameters, "memory_mb": 8}],
    }
    (out / "models.json").write_text(json.dumps({"version": 1, "models": [entry]}, indent=2) + "\n")


class VisionEncoder(torch.nn.Module):
    """pixel_values [batch, images, 3, H, W] + pixel_attention_mask -> image_features [views, tokens, text hidden]."""

    def __init__(self, model):
        super().__init__()
        self.model = model.model

    def forward(self, pixel_values, pixel_attention_mask):
        # SmolVLMModel.get_image_features, with the patch mask read by a reshape
        # instead of unfold (which the exporter cannot take on a dynamic shape).
        b, n, c, h, w = pixel_values.shape
        p = self.model.config.vision_config.patch_size
        pixel_values = pixel_values.reshape(b * n, c, h, w)
        mask = pixel_attention_mask.reshape(b * n, h, w)
        real = (pixel_values == 0.0).sum(dim=(-1, -2, -3)) != c * h * w  # padding views are all zeros
        pixel_values, mask = pixel_values[real], mask[real]
        patch_mask = mask.reshape(-1, h // p, p, w // p, p).sum(dim=(2, 4)) > 0
        hidden = self.model.vision_model(pixel_values=pixel_values, patch_attention_mask=patch_mask).last_hidden_state
        return self.model.connector(hidden)


class EmbedTokens(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.embed = model.model.text_model.embed_tokens

    def forward(self, input_ids):
        return self.embed(input_ids)


class Decoder(torch.nn.Module):
    """inputs_embeds, attention_mask [batch, past + new], position_ids, past_key_values.* -> logits, present.*"""

    def __init__(self, model):
        super().__init__()
        self.text, self.head = model.model.text_model, model.lm_head
        self.layers = model.config.text_config.num_hidden_layers

    def forward(self, inputs_embeds, attention_mask, position_ids, *past):
        from transformers.cache_utils import DynamicCache
        cache = DynamicCache()
        for layer in range(self.layers):
            cache.update(past[2 * layer], past[2 * layer + 1], layer)
        new, total = inputs_embeds.shape[1], attention_mask.shape[1]
        # Causal within the new tokens, and only the positions the 2-D mask keeps (left padding of batched rows).
        key = torch.arange(total).unsqueeze(0)
        query = torch.arange(new).unsqueeze(1) + (total - new)
        allowed = (key <= query).unsqueeze(0).unsqueeze(0) & attention_mask.bool().unsqueeze(1).unsqueeze(2)
        mask = torch.where(allowed, 0.0, torch.finfo(torch.float32).min)
        out = self.text(inputs_embeds=inputs_embeds, attention_mask=mask, position_ids=position_ids,
                        past_key_values=cache, use_cache=True)
        presents = []
        for layer in out.past_key_values.layers:
            presents += [layer.keys, layer.values]
        return (self.head(out.last_hidden_state), *presents)


def vectorised_position_ids(self, pixel_values, patch_attention_mask):
    """SmolVLMVisionEmbeddings.forward without its per-image Python loop, so
    that the traced graph takes any number of views (same values)."""
    batch_size, _, max_im_h, max_im_w = pixel_values.shape
    embeddings = self.patch_embedding(pixel_values).flatten(2).transpose(1, 2)
    side = self.num_patches_per_side
    boundaries = torch.arange(1 / side, 1.0, 1 / side)
    rows, cols = max_im_h // self.patch_size, max_im_w // self.patch_size
    nb_h = patch_attention_mask[:, :, 0].sum(1, keepdim=True).to(pixel_values.dtype)
    nb_w = patch_attention_mask[:, 0, :].sum(1, keepdim=True).to(pixel_values.dtype)
    frac_h = torch.arange(rows, dtype=pixel_values.dtype).unsqueeze(0) / nb_h * (1 - 1e-6)
    frac_w = torch.arange(cols, dtype=pixel_values.dtype).unsqueeze(0) / nb_w * (1 - 1e-6)
    bucket_h = (boundaries.view(1, 1, -1) <= frac_h.unsqueeze(-1)).sum(-1)
    bucket_w = (boundaries.view(1, 1, -1) <= frac_w.unsqueeze(-1)).sum(-1)
    pos = (bucket_h.unsqueeze(2) * side + bucket_w.unsqueeze(1)).flatten(1)
    pos = torch.where(patch_attention_mask.view(batch_size, -1), pos, torch.zeros_like(pos))
    return embeddings + self.position_embedding(pos)


def export(model, out):
    """The three graphs, named as onnx-community's SmolVLM exports name them."""
    from transformers.models.smolvlm import modeling_smolvlm
    out.mkdir(parents=True, exist_ok=True)
    modeling_smolvlm.SmolVLMVisionEmbeddings.forward = vectorised_position_ids
    tc, side = model.config.text_config, model.config.vision_config.image_size
    kv, hd, layers = tc.num_key_value_heads, tc.hidden_size // tc.num_attention_heads, tc.num_hidden_layers
    common = dict(opset_version=17, dynamo=False, do_constant_folding=True)
    pv = torch.rand(1, 2, 3, side, side) * 2 - 1
    torch.onnx.export(VisionEncoder(model), (pv, torch.ones(1, 2, side, side, dtype=torch.bool)),
                      str(out / "vision_encoder.onnx"), input_names=["pixel_values", "pixel_attention_mask"],
                      output_names=["image_features"],
                      dynamic_axes={"pixel_values": {0: "batch_size", 1: "num_images"},
                                    "pixel_attention_mask": {0: "batch_size", 1: "num_images"},
                                    "image_features": {0: "num_views"}}, **common)
    torch.onnx.export(EmbedTokens(model), (torch.tensor([[1, 2, 3]]),), str(out / "embed_tokens.onnx"),
                      input_names=["input_ids"], output_names=["inputs_embeds"],
                      dynamic_axes={"input_ids": {0: "batch_size", 1: "sequence_length"},
                                    "inputs_embeds": {0: "batch_size", 1: "sequence_length"}}, **common)
    past_names = [f"past_key_values.{l}.{k}" for l in range(layers) for k in ("key", "value")]
    present_names = [f"present.{l}.{k}" for l in range(layers) for k in ("key", "value")]
    past = [torch.randn(1, kv, 2, hd) for _ in past_names]
    axes = {"inputs_embeds": {0: "batch_size", 1: "sequence_length"},
            "attention_mask": {0: "batch_size", 1: "total_sequence_length"},
            "position_ids": {0: "batch_size", 1: "sequence_length"}, "logits": {0: "batch_size", 1: "sequence_length"}}
    axes.update({n: {0: "batch_size", 2: "past_sequence_length"} for n in past_names})
    axes.update({n: {0: "batch_size", 2: "total_sequence_length"} for n in present_names})
    torch.onnx.export(Decoder(model), (torch.randn(1, 3, tc.hidden_size), torch.ones(1, 5, dtype=torch.long),
                                       torch.tensor([[2, 3, 4]]), *past),
                      str(out / "decoder_model_merged.onnx"),
                      input_names=["inputs_embeds", "attention_mask", "position_ids", *past_names],
                      output_names=["logits", *present_names], dynamic_axes=axes, **common)


def onnx_greedy(folder, inputs, image_token_id, eos, n):
    """Greedy decoding on the three graphs: image features in place of the
    <image> embeddings, a prefill from an empty cache, then a token a step."""
    import numpy as np
    import onnxruntime as ort
    s = {name: ort.InferenceSession(str(folder / f"{name}.onnx"), providers=["CPUExecutionProvider"])
         for name in ("vision_encoder", "embed_tokens", "decoder_model_merged")}
    ids = inputs["input_ids"].numpy()
    features = s["vision_encoder"].run(None, {"pixel_values": inputs["pixel_values"].numpy(),
                                              "pixel_attention_mask": inputs["pixel_attention_mask"].numpy().astype(bool)})[0]
    embeds = s["embed_tokens"].run(None, {"input_ids": ids})[0]
    embeds[ids == image_token_id] = features.reshape(-1, features.shape[-1])
    dec = s["decoder_model_merged"]
    past = {i.name: np.zeros([1, i.shape[1], 0, i.shape[3]], np.float32) for i in dec.get_inputs()
            if i.name.startswith("past_key_values.")}
    tokens, total = [], ids.shape[1]
    for _ in range(n):
        new = embeds.shape[1]
        outs = dec.run(None, {"inputs_embeds": embeds, "attention_mask": np.ones([1, total], np.int64),
                              "position_ids": np.arange(total - new, total, dtype=np.int64)[None], **past})
        token = int(outs[0][0, -1].argmax())
        tokens.append(token)
        if token == eos:
            break
        past = {n.replace("present", "past_key_values"): v
                for n, v in zip([o.name for o in dec.get_outputs()][1:], outs[1:])}
        embeds = s["embed_tokens"].run(None, {"input_ids": np.array([[token]], np.int64)})[0]
        total += 1
    return tokens


if __name__ == "__main__":
    main(Path(sys.argv[1]))
