#!/usr/bin/env python3
"""Make the small models, images and expected outputs that inferd's tests and
examples use, and write what Python's onnxruntime answers for them.

Run once when the fixtures must change; commit what it writes (all small):

    python3 -m venv /tmp/fx && /tmp/fx/bin/pip install onnx==1.23.2 numpy==2.4.6 \
        onnxruntime==1.31.1 pillow==13.0.0
    /tmp/fx/bin/pip install tokenizers==0.23.3   # for the embedding references
    scripts/setup.sh                              # fetches the MiniLM model and tokenizer
    /tmp/fx/bin/python scripts/make_fixtures.py

Everything is seeded, so a second run writes the same bytes.
"""
import hashlib
import io
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "models"
FIXTURES = ROOT / "tests" / "fixtures"
EXAMPLES = ROOT / "examples"
OPSET = 13
RNG = np.random.default_rng(20261123)


def save(model, path):
    model.ir_version = 8
    model.opset_import[0].version = OPSET
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(model.SerializeToString())
    return hashlib.sha256(path.read_bytes()).hexdigest()


def init(name, array):
    return numpy_helper.from_array(np.asarray(array), name)


def color_classifier(path):
    """Scores red/green/blue by the mean of each channel: known by construction."""
    nodes = [
        helper.make_node("ReduceMean", ["image"], ["means"], axes=[2, 3], keepdims=0),
        helper.make_node("Mul", ["means", "gain"], ["scores"]),
    ]
    graph = helper.make_graph(
        nodes,
        "color",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, 64, 64])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["N", 3])],
        [init("gain", np.array(10.0, dtype=np.float32))],
    )
    return save(helper.make_model(graph, producer_name="inferd-fixtures"), path)


def tiny_cnn(path):
    """A small convolutional classifier with seeded random weights (32x32 RGB, 10 classes)."""
    w1 = RNG.normal(0, 0.3, (8, 3, 3, 3)).astype(np.float32)
    b1 = RNG.normal(0, 0.1, (8,)).astype(np.float32)
    w2 = RNG.normal(0, 0.2, (16, 8, 3, 3)).astype(np.float32)
    b2 = RNG.normal(0, 0.1, (16,)).astype(np.float32)
    w3 = RNG.normal(0, 0.3, (16, 10)).astype(np.float32)
    b3 = RNG.normal(0, 0.1, (10,)).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["input", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("MaxPool", ["r1"], ["p1"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Conv", ["p1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["r2"]),
        helper.make_node("GlobalAveragePool", ["r2"], ["g"]),
        helper.make_node("Flatten", ["g"], ["f"], axis=1),
        helper.make_node("Gemm", ["f", "w3", "b3"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes,
        "tinycnn",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 32, 32])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
        [init(n, a) for n, a in [("w1", w1), ("b1", b1), ("w2", w2), ("b2", b2), ("w3", w3), ("b3", b3)]],
    )
    return save(helper.make_model(graph, producer_name="inferd-fixtures"), path)


def mlp(path, hidden):
    """x[N,16] -> Gemm -> Relu -> Gemm -> y[N,4]: a raw-tensor model in two sizes."""
    w1 = RNG.normal(0, 0.4, (16, hidden)).astype(np.float32)
    b1 = RNG.normal(0, 0.1, (hidden,)).astype(np.float32)
    w2 = RNG.normal(0, 0.4, (hidden, 4)).astype(np.float32)
    b2 = RNG.normal(0, 0.1, (4,)).astype(np.float32)
    nodes = [
        helper.make_node("Gemm", ["x", "w1", "b1"], ["h"]),
        helper.make_node("Relu", ["h"], ["hr"]),
        helper.make_node("Gemm", ["hr", "w2", "b2"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        f"mlp{hidden}",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
        [init(n, a) for n, a in [("w1", w1), ("b1", b1), ("w2", w2), ("b2", b2)]],
    )
    return save(helper.make_model(graph, producer_name="inferd-fixtures"), path)


def mixed(path):
    """Two inputs of different types, two outputs: sum = a + float(b), best = argmax(a)."""
    nodes = [
        helper.make_node("Cast", ["b"], ["bf"], to=TensorProto.FLOAT),
        helper.make_node("Add", ["a", "bf"], ["sum"]),
        helper.make_node("ArgMax", ["a"], ["best"], axis=1, keepdims=0),
    ]
    graph = helper.make_graph(
        nodes,
        "mixed",
        [
            helper.make_tensor_value_info("a", TensorProto.FLOAT, ["N", 4]),
            helper.make_tensor_value_info("b", TensorProto.INT64, ["N", 4]),
        ],
        [
            helper.make_tensor_value_info("sum", TensorProto.FLOAT, ["N", 4]),
            helper.make_tensor_value_info("best", TensorProto.INT64, ["N"]),
        ],
    )
    return save(helper.make_model(graph, producer_name="inferd-fixtures"), path)


def busy(path):
    """Runs `iterations` rounds of x = tanh(x @ W): a model whose run time the caller sets."""
    w = np.random.default_rng(11).normal(0, 0.1, (128, 128)).astype(np.float32)
    body = helper.make_graph(
        [
            helper.make_node("MatMul", ["x_in", "w"], ["m"]),
            helper.make_node("Tanh", ["m"], ["x_out"]),
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
        ],
        "body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("x_in", TensorProto.FLOAT, [1, 128]),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("x_out", TensorProto.FLOAT, [1, 128]),
        ],
    )
    graph = helper.make_graph(
        [helper.make_node("Loop", ["iterations", "", "x"], ["y"], body=body)],
        "busy",
        [
            helper.make_tensor_value_info("iterations", TensorProto.INT64, []),
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 128]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 128])],
        [init("w", w)],
    )
    return save(helper.make_model(graph, producer_name="inferd-fixtures"), path)


def reshape(path):
    """y = reshape(x, [2, 2]): valid for 4 elements, a run-time engine error otherwise."""
    graph = helper.make_graph(
        [helper.make_node("Reshape", ["x", "shape"], ["y"])],
        "reshape",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 2])],
        [init("shape", np.array([2, 2], dtype=np.int64))],
    )
    return save(helper.make_model(graph, producer_name="inferd-fixtures"), path)


DET_CLASSES = ["cat", "dog", "bird"]


def detection_candidates():
    """Candidate boxes in the 64x64 input (cx, cy, w, h), objectness and class scores."""
    return [
        # same class, overlapping: NMS keeps the better one
        ((20, 30, 16, 12), 0.9, [0.95, 0.03, 0.02]),
        ((21, 31, 16, 12), 0.8, [0.90, 0.05, 0.05]),
        # another class at the same place: kept (NMS is class-wise)
        ((20, 30, 15, 13), 0.85, [0.05, 0.90, 0.05]),
        # far away, its own box
        ((48, 40, 10, 20), 0.7, [0.1, 0.1, 0.8]),
        # too weak: filtered by the confidence threshold
        ((40, 15, 8, 8), 0.2, [0.5, 0.3, 0.2]),
        ((10, 50, 6, 6), 0.9, [0.2, 0.15, 0.1]),
        # overlaps the dog a little (IoU below the threshold): kept
        ((28, 34, 14, 12), 0.75, [0.1, 0.85, 0.05]),
        # empty slot
        ((0, 0, 0, 0), 0.0, [0.0, 0.0, 0.0]),
    ]


def detector(path, layout):
    """A 'detector' whose raw output is the constant candidate table, in YOLOv5
    ([1, N, 5 + C]) or YOLOv8 ([1, 4 + C, N]) layout; it reads its input so
    engines keep it, but the input does not change the output."""
    rows = []
    for (cx, cy, w, h), obj, cls in detection_candidates():
        if layout == "yolov5":
            rows.append([cx, cy, w, h, obj] + cls)
        else:
            rows.append([cx, cy, w, h] + [obj * c for c in cls])
    table = np.array(rows, dtype=np.float32)[None]
    if layout == "yolov8":
        table = table.transpose(0, 2, 1).copy()
    nodes = [
        helper.make_node("ReduceMean", ["images"], ["m"], axes=[1, 2, 3], keepdims=0),
        helper.make_node("Mul", ["m", "zero"], ["z"]),
        helper.make_node("Add", ["table", "z"], ["output0"]),
    ]
    graph = helper.make_graph(
        nodes,
        f"det_{layout}",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, 64, 64])],
        [helper.make_tensor_value_info("output0", TensorProto.FLOAT, list(table.shape))],
        [init("table", table), init("zero", np.array([0.0], dtype=np.float32))],
    )
    return save(helper.make_model(graph, producer_name="inferd-fixtures"), path)


def reference_detections(layout, orig_w, orig_h, size=64, conf=0.25, iou=0.45):
    """What a YOLO decoder must answer: confidence filter, class-wise NMS,
    boxes mapped back through the letterbox to the original image."""
    cands = []
    for (cx, cy, w, h), obj, cls in detection_candidates():
        scores = [obj * c for c in cls]
        k = int(np.argmax(scores))
        if scores[k] < conf:
            continue
        cands.append([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2, scores[k], k])
    cands.sort(key=lambda c: -c[4])

    def iou_of(a, b):
        ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
        iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
        inter = ix * iy
        union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
        return inter / union if union > 0 else 0.0

    kept = []
    for c in cands:
        if all(k[5] != c[5] or iou_of(k, c) <= iou for k in kept):
            kept.append(c)
    scale = min(size / orig_w, size / orig_h)
    nw = min(max(round(orig_w * scale), 1), size)
    nh = min(max(round(orig_h * scale), 1), size)
    px, py = (size - nw) // 2, (size - nh) // 2
    out = []
    for x1, y1, x2, y2, score, k in kept:
        box = [(x1 - px) / scale, (y1 - py) / scale, (x2 - px) / scale, (y2 - py) / scale]
        box = [min(max(box[0], 0), orig_w), min(max(box[1], 0), orig_h), min(max(box[2], 0), orig_w), min(max(box[3], 0), orig_h)]
        out.append({"index": k, "label": DET_CLASSES[k], "score": float(np.float32(score)), "box": [float(v) for v in box]})
    return out


EMBEDDING_TEXTS = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The new movie is awesome.",
    "The cat sits outside on the mat.",
    "Edge boxes run ONNX models close to the cameras.",
    " ".join(["This long sentence repeats itself to pass the tokenizer's limit of one hundred and twenty eight tokens."] * 8),
]


def embedding_references():
    """Sentence embeddings as Python computes them: the same ONNX file in
    onnxruntime, the same tokenizer, mean pooling over the attention mask, L2 norm."""
    from tokenizers import Tokenizer

    fetched = ROOT / "models" / "fetched" / "minilm"
    tok = Tokenizer.from_file(str(fetched / "tokenizer.json"))
    sess = ort.InferenceSession(str(fetched / "model.onnx"), providers=["CPUExecutionProvider"])
    out = []
    for text in EMBEDDING_TEXTS:
        enc = tok.encode(text)
        ids = np.array([enc.ids], dtype=np.int64)
        mask = np.array([enc.attention_mask], dtype=np.int64)
        types = np.array([enc.type_ids], dtype=np.int64)
        hidden = sess.run(["last_hidden_state"], {"input_ids": ids, "attention_mask": mask, "token_type_ids": types})[0]
        m = mask[..., None].astype(np.float32)
        pooled = (hidden * m).sum(1) / np.clip(m.sum(1), 1e-9, None)
        pooled = pooled / np.linalg.norm(pooled, axis=1, keepdims=True)
        out.append([float(x) for x in pooled[0]])
    return {"texts": EMBEDDING_TEXTS, "embeddings": out}


OCR_LINE = "Edge inferd 2026"


def text_line_case():
    """A rendered text line (48 px high, as PP-OCR's recogniser takes it) and
    what the v4 recogniser answers in Python: normalised (x / 255 - 0.5) / 0.5,
    greedy CTC over blank + the model's `character` dictionary + space."""
    from PIL import ImageDraw, ImageFont

    font = ImageFont.load_default(size=30)
    width = int(font.getlength(OCR_LINE)) + 16
    img = Image.new("RGB", (width, 48), (255, 255, 255))
    ImageDraw.Draw(img).text((8, 8), OCR_LINE, fill=(0, 0, 0), font=font)
    img.save(FIXTURES / "text-line.png")
    rec = ROOT / "models" / "fetched" / "ocr" / "v4" / "rec.onnx"
    chars = {p.key: p.value for p in onnx.load(str(rec)).metadata_props}["character"].splitlines()
    classes = [""] + chars + [" "]
    x = (np.asarray(img, dtype=np.float32)[:, :, ::-1] / 255.0 - 0.5) / 0.5
    x = x.transpose(2, 0, 1)[None].astype(np.float32)
    sess = ort.InferenceSession(str(rec), providers=["CPUExecutionProvider"])
    probs = sess.run(None, {"x": x})[0][0]
    best = probs.argmax(1)
    text, prev = "", -1
    for i in best:
        if i != 0 and i != prev:
            text += classes[i]
        prev = i
    return {"image": "text-line.png", "rendered": OCR_LINE, "text": text, "classes": len(classes)}


def tensor_json(array):
    dtype = {"float32": "f32", "int64": "i64"}[str(array.dtype)]
    return {"shape": list(array.shape), "dtype": dtype, "data": array.flatten().tolist()}


def run_reference(model_path, feeds):
    sess = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, feeds)))


def write_jpeg(path, rgb, size):
    Image.new("RGB", size, rgb).save(path, "JPEG", quality=90)


def png_chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def bomb_png(path, side):
    """A valid PNG whose header declares side x side pixels with one tiny IDAT."""
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 1024)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b""))


def main():
    shas = {
        "color": color_classifier(MODELS / "color" / "color.onnx"),
        "tinycnn": tiny_cnn(MODELS / "tinycnn" / "tinycnn.onnx"),
        "mlp-large": mlp(MODELS / "mlp" / "mlp-64.onnx", 64),
        "mlp-small": mlp(MODELS / "mlp" / "mlp-8.onnx", 8),
        "mixed": mixed(MODELS / "mixed" / "mixed.onnx"),
    }
    (MODELS / "color" / "labels.txt").write_text("red\ngreen\nblue\n")
    (MODELS / "tinycnn" / "labels.txt").write_text("".join(f"class{i}\n" for i in range(10)))

    EXAMPLES.mkdir(exist_ok=True)
    write_jpeg(EXAMPLES / "red.jpg", (230, 20, 25), (97, 61))
    write_jpeg(EXAMPLES / "green.jpg", (15, 210, 30), (64, 64))
    write_jpeg(EXAMPLES / "blue.jpg", (20, 30, 220), (40, 120))

    FIXTURES.mkdir(parents=True, exist_ok=True)
    # A 32x32 lossless image: the image pipeline needs no resize, so Rust and
    # Python see the very same tensor.
    pattern = RNG.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(pattern, "RGB").save(FIXTURES / "pattern32.png")
    pattern_tensor = (pattern.astype(np.float32) / 255.0 - np.array([0.485, 0.456, 0.406], np.float32)) / np.array(
        [0.229, 0.224, 0.225], np.float32
    )
    pattern_tensor = pattern_tensor.transpose(2, 0, 1)[None].astype(np.float32)

    # Cut inside the entropy-coded scan: decoders tend to pad such a file
    # with grey rather than fail, so inferd must notice on its own.
    noise = np.random.default_rng(7).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    jpeg = io.BytesIO()
    Image.fromarray(noise, "RGB").save(jpeg, "JPEG", quality=90)
    (FIXTURES / "truncated.jpg").write_bytes(jpeg.getvalue()[: len(jpeg.getvalue()) * 9 // 10])
    png = (FIXTURES / "pattern32.png").read_bytes()
    (FIXTURES / "truncated.png").write_bytes(png[: len(png) * 2 // 3])
    (FIXTURES / "empty.jpg").write_bytes(b"")
    bomb_png(FIXTURES / "bomb.png", 100000)
    bomb_png(FIXTURES / "huge-12000.png", 12000)
    Image.new("RGB", (1, 1), (255, 0, 0)).save(FIXTURES / "one-pixel.png")
    (FIXTURES / "not-an-image.jpg").write_bytes(b"this is plain text, not a JPEG\n")

    x = RNG.normal(0, 1, (3, 16)).astype(np.float32)
    a = RNG.normal(0, 1, (2, 4)).astype(np.float32)
    b = RNG.integers(-5, 5, (2, 4), dtype=np.int64)
    tiny_in = RNG.normal(0, 1, (1, 3, 32, 32)).astype(np.float32)
    cases = [
        ("mlp", "large", MODELS / "mlp" / "mlp-64.onnx", {"x": x}),
        ("mlp", "small", MODELS / "mlp" / "mlp-8.onnx", {"x": x}),
        ("mixed", "default", MODELS / "mixed" / "mixed.onnx", {"a": a, "b": b}),
        ("tinycnn", "fp32", MODELS / "tinycnn" / "tinycnn.onnx", {"input": tiny_in}),
    ]
    expected = {"onnxruntime": ort.__version__, "tensor_cases": [], "image_cases": []}
    for model, variant, path, feeds in cases:
        outputs = run_reference(path, feeds)
        expected["tensor_cases"].append(
            {
                "model": model,
                "variant": variant,
                "inputs": {k: tensor_json(v) for k, v in feeds.items()},
                "outputs": {k: tensor_json(v) for k, v in outputs.items()},
            }
        )
    logits = run_reference(MODELS / "tinycnn" / "tinycnn.onnx", {"input": pattern_tensor})["logits"][0]
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    order = np.argsort(-probs, kind="stable")[:3]
    expected["image_cases"].append(
        {
            "model": "tinycnn",
            "image": "pattern32.png",
            "top": [{"index": int(i), "label": f"class{i}", "score": float(probs[i])} for i in order],
        }
    )
    # Detectors with constructed outputs, in both YOLO layouts, and what a reference decoder answers.
    # (Test-only: no YOLO with trained weights is on the package registries.)
    for layout in ["yolov5", "yolov8"]:
        shas[f"yolo-{layout}"] = detector(FIXTURES / "models" / f"{layout}.onnx", layout)
        expected["detection_cases"] = expected.get("detection_cases", []) + [
            {"layout": layout, "image": "examples/red.jpg", "detections": reference_detections(layout, 97, 61)}
        ]
    expected["embedding_case"] = embedding_references()
    expected["text_line_case"] = text_line_case()
    (FIXTURES / "models" / "detector-labels.txt").write_text("".join(f"{c}\n" for c in DET_CLASSES))
    (FIXTURES / "expected.json").write_text(json.dumps(expected, separators=(",", ":")) + "\n")
    # Models only the tests use: one whose run time the caller sets, one that fails at run time.
    shas["busy"] = busy(FIXTURES / "models" / "busy.onnx")
    shas["reshape"] = reshape(FIXTURES / "models" / "reshape.onnx")
    for name, sha in shas.items():
        print(f"{name}: {sha}")


if __name__ == "__main__":
    main()
