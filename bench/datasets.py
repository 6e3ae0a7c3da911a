"""Real data and real models for the benchmarks, all offline.

- digits: scikit-learn's handwritten digits, split as examples/digits/train.py splits them;
- text lines: words rendered with Pillow's bundled font, upright or turned 180 degrees, and
  preprocessed as RapidOCR preprocesses crops for its models (the labels are the rotation);
- models: the bundled digits models and the PP-OCR models inside `rapidocr_onnxruntime`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "examples" / "digits"
WORDS = [
    "quantize",
    "integer",
    "scale",
    "zero",
    "point",
    "calibration",
    "histogram",
    "kernel",
    "tensor",
    "channel",
    "weight",
    "model",
    "inference",
    "latency",
    "accuracy",
    "network",
    "layer",
    "graph",
    "export",
    "runtime",
    "symmetric",
    "affine",
    "offline",
    "report",
    "budget",
    "range",
    "error",
    "signal",
    "noise",
    "2026",
    "int8",
    "uint8",
    "ONNX",
    "0.5",
    "x4",
    "batch",
]


@dataclass(frozen=True)
class Task:
    """A model with calibration data, evaluation data and (optionally) labels."""

    name: str
    model: Path
    input_name: str
    calib: np.ndarray
    evaluate: np.ndarray
    labels: np.ndarray | None
    latency_batch: int
    metric: str  # "accuracy", "ctc" or "sqnr"


def digits_split() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fit images, test images, test labels) as train.py made them."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = digits.images.astype(np.float32)[:, None] / 16.0
    order = np.random.default_rng(0).permutation(len(images))
    test, fit = order[:540], order[540:]
    return images[fit], images[test], digits.target[test]


def rapidocr_model(name: str) -> Path:
    import rapidocr_onnxruntime

    return Path(rapidocr_onnxruntime.__file__).parent / "models" / name


def text_lines(count: int, width: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """`count` RapidOCR-preprocessed text crops (3, 48, width) and their rotation (0 or 1)."""
    rng = np.random.default_rng(seed)
    font = ImageFont.load_default(size=int(rng.integers(26, 34)))
    crops, turned = [np.zeros((0, 3, 48, width), np.float32)], rng.integers(0, 2, count)
    for flip in turned:
        words = " ".join(rng.choice(WORDS, int(rng.integers(1, 4))))
        ink = int(rng.integers(0, 90))
        paper = int(rng.integers(170, 256))
        box = font.getbbox(words)
        image = Image.new("RGB", (box[2] + 16, 48), (paper,) * 3)
        ImageDraw.Draw(image).text((8, 24), words, fill=(ink,) * 3, font=font, anchor="lm")
        if flip:
            image = image.rotate(180)
        pixels = np.asarray(image, np.float32)
        pixels = pixels + rng.normal(0, 6, pixels.shape)  # scanner noise
        crops.append(_rapidocr_normalize(pixels.clip(0, 255), width)[None])
    return np.concatenate(crops), turned


def _rapidocr_normalize(pixels: np.ndarray, width: int) -> np.ndarray:
    """RapidOCR's resize_norm_img: keep the aspect ratio at height 48, scale to [-1, 1], pad."""
    height = 48
    resized_w = min(width, int(np.ceil(height * pixels.shape[1] / pixels.shape[0])))
    image = Image.fromarray(pixels.astype(np.uint8)).resize((resized_w, height))
    chw = np.asarray(image, np.float32).transpose(2, 0, 1) / 255.0
    out = np.zeros((3, height, width), np.float32)
    out[:, :, :resized_w] = (chw - 0.5) / 0.5
    return out


def tasks(calib_samples: int) -> list[Task]:
    """The benchmark tasks with `calib_samples` calibration samples each (0: models only)."""
    fit, test, labels = digits_split()
    out = [
        Task(
            name,
            DIGITS / f"{name}.onnx",
            "input",
            fit[:calib_samples],
            test,
            labels,
            64,
            "accuracy",
        )
        for name in ("cnn", "mobilenet", "transformer")
    ]
    evaluate = 256 if calib_samples else 0
    cls_calib, _ = text_lines(calib_samples, 192, seed=1)
    cls_eval, cls_labels = text_lines(evaluate, 192, seed=2)
    out.append(
        Task(
            "ppocr_cls",
            rapidocr_model("ch_ppocr_mobile_v2.0_cls_infer.onnx"),
            "x",
            cls_calib,
            cls_eval,
            cls_labels,
            1,
            "accuracy",
        )
    )
    rec_calib, _ = text_lines(calib_samples, 320, seed=3)
    rec_eval, _ = text_lines(evaluate // 2, 320, seed=4)
    out.append(
        Task(
            "ppocr_rec",
            rapidocr_model("ch_PP-OCRv4_rec_infer.onnx"),
            "x",
            rec_calib,
            rec_eval,
            None,
            1,
            "ctc",
        )
    )
    return out
