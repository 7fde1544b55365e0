#!/usr/bin/env python3
"""The vision-language task's reference model: a tiny random-weight SmolVLM
built with transformers' own classes (SmolVLMForConditionalGeneration, 144k
parameters: a 2-layer SigLIP-style encoder on 64-pixel views of 16-pixel
patches, pixel shuffle by 2 -> 4 image tokens per view, a 2-layer llama
decoder, a 300-token byte-level BPE with SmolVLM's special tokens), its
processor at the scale of tests/fixtures/vlm (longest edge 192, tiles 64),
SmolVLM's chat template, and transformers' greedy tokens for the six fixture
images.

    python3 -m venv /tmp/hf && /tmp/hf/bin/pip install transformers==4.57.1 pillow==13.0.0 \
        torch==2.9.1 torchvision==0.24.1 num2words numpy
    /tmp/hf/bin/python scripts/make_vlm_fixture_model.py tests/fixtures/vlm/model

Writes tokenizer.json, model/ (config and safetensors weights, for exporting
the three ONNX graphs) and reference.json: per image the chat prompt, the
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
CORPUS = ("A camera watches the gate. Is the gate open? The gate is closed. A red car waits. "
          "The receipt shows a total of seven euros forty. Describe the picture in one sentence. ") * 20
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<end_of_utterance>", "<fake_token_around_image>", "<image>",
           "<global-img>"] + [f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)]
TEMPLATE = ("<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}"
            "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
            "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
            "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n"
            "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}")


def main(out):
    out.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([CORPUS], trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIAL,
                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tok.save(str(out / "tokenizer.json"))
    fast = PreTrainedTokenizerFast(tokenizer_file=str(out / "tokenizer.json"), eos_token="<end_of_utterance>",
                                   pad_token="<|endoftext|>", bos_token="<|im_start|>")
    fast.fake_image_token, fast.image_token, fast.global_image_token = "<fake_token_around_image>", "<image>", "<global-img>"
    fast.end_of_utterance_token = "<end_of_utterance>"
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
    ip = SmolVLMImageProcessor(size={"longest_edge": 192}, max_image_size={"longest_edge": 64},
                               image_mean=[0.5] * 3, image_std=[0.5] * 3)
    proc = SmolVLMProcessor(image_processor=ip, tokenizer=fast, video_processor=SmolVLMVideoProcessor(), image_seq_len=4,
                            chat_template=TEMPLATE)
    expected = json.loads((FIX / "expected.json").read_text())
    rows = []
    for case in expected["cases"]:
        img = Image.open(FIX / case["image"]).convert("RGB")
        msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Is the gate open?"}]}]
        text = proc.apply_chat_template(msgs, add_generation_prompt=True)
        inputs = proc(text=text, images=[img], return_tensors="pt")
        inputs.pop("token_type_ids", None)
        with torch.no_grad():
            gen = model.generate(**inputs, max_new_tokens=10, do_sample=False)
        new = gen[0, inputs["input_ids"].shape[1]:].tolist()
        rows.append({"image": case["image"], "prompt": text, "input_ids": inputs["input_ids"][0].tolist(),
                     "pixel_values_shape": list(inputs["pixel_values"].shape), "tokens": new})
        print(case["image"], len(inputs["input_ids"][0]), list(inputs["pixel_values"].shape), new)
    (out / "reference.json").write_text(json.dumps({"chat_template": TEMPLATE, "image_seq_len": 4, "cases": rows}, indent=1) + "\n")
    model.save_pretrained(out / "model")
    print(sum(p.numel() for p in model.parameters()), "parameters")


main(Path(sys.argv[1]))
