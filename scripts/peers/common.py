"""What a Python service does for inferd's models: the same pre- and
post-processing as inferd (read from models.json), on onnxruntime.
Shared by the two peers the benchmark compares inferd with."""
import io
import json
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]


class Model:
    """One model of models.json: an image classifier, or `ocr` through RapidOCR."""

    def __init__(self, name, registry=ROOT / "models.json"):
        spec = next(m for m in json.loads(Path(registry).read_text())["models"] if m["name"] == name)
        self.name, self.task = name, spec["task"]
        variant = max(spec["variants"], key=lambda v: v.get("quality", 0))
        if self.task == "ocr":
            from rapidocr_onnxruntime import RapidOCR  # the reference OCR pipeline
            self.ocr = RapidOCR()
            return
        opts = ort.SessionOptions()
        self.session = ort.InferenceSession(str(ROOT / variant["file"]), opts, providers=["CPUExecutionProvider"])
        self.input = spec["input"]
        self.labels = (ROOT / spec["labels"]).read_text().splitlines() if spec.get("labels") else []
        self.top_k = spec.get("output", {}).get("top_k", 5)

    def infer(self, payload: bytes) -> dict:
        if self.task == "ocr":
            img = np.asarray(Image.open(io.BytesIO(payload)).convert("RGB"))[:, :, ::-1]
            t = time.perf_counter()
            result, _ = self.ocr(img)
            ms = (time.perf_counter() - t) * 1000
            lines = [{"text": text, "confidence": float(score), "box": box} for box, text, score in (result or [])]
            return {"model": self.name, "timings": {"infer_ms": ms}, "result": {"lines": lines}}
        spec = self.input
        img = Image.open(io.BytesIO(payload)).convert("RGB").resize((spec["width"], spec["height"]), Image.BILINEAR)
        x = np.asarray(img, dtype=np.float32)
        if spec.get("channels", "RGB") == "BGR":
            x = x[:, :, ::-1]
        x = (x * spec.get("scale", 1 / 255) - np.array(spec.get("mean", [0, 0, 0]), np.float32)) / np.array(
            spec.get("std", [1, 1, 1]), np.float32
        )
        if spec.get("layout", "NCHW") == "NCHW":
            x = x.transpose(2, 0, 1)
        x = np.ascontiguousarray(x[None], dtype=np.float32)
        t = time.perf_counter()
        (scores,) = self.session.run(None, {self.session.get_inputs()[0].name: x})[:1]
        ms = (time.perf_counter() - t) * 1000
        logits = scores[0].astype(np.float64)
        p = np.exp(logits - logits.max())
        p /= p.sum()
        top = np.argsort(-p)[: self.top_k]
        classes = [
            {"index": int(i), "label": self.labels[i] if i < len(self.labels) else None, "score": float(p[i])} for i in top
        ]
        return {"model": self.name, "timings": {"infer_ms": ms}, "result": {"classes": classes}}
