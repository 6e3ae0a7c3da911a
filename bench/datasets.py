"""The benchmark tasks of bench/ptq.py and the scripts that share them, all offline: each model
with its calibration data, evaluation data, labels and metric.

- digits: scikit-learn's handwritten digits, split as examples/digits/train.py splits them;
- PP-OCR's classifier, recognizer and detector: text lines and pages (text_images.py);
- EfficientNet-Lite0: photo crops (photos.py); all-MiniLM-L6-v2: sentences (sentences.py).

The models come from model_files.py; bench/unseen.py's data from faces.py, speech.py,
file_bytes.py, microscope.py and captchas.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from model_files import DIGITS, efficientnet_lite0, minilm, rapidocr_model
from photos import photo_crops
from sentences import sentences
from text_images import text_lines, text_pages


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
    # "accuracy", "ctc" (decoded text agreement), "top1" (agreement with FP32's class),
    # "iou" (text mask, probability > 0.3, against FP32's) or "neighbour" (each sentence's
    # nearest other sentence, by cosine, the same as FP32's)
    metric: str


def digits_split() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fit images, test images, test labels) as train.py made them."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = digits.images.astype(np.float32)[:, None] / 16.0
    order = np.random.default_rng(0).permutation(len(images))
    test, fit = order[:540], order[540:]
    return images[fit], images[test], digits.target[test]


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
    out.append(
        Task(
            "ppocr_det",
            rapidocr_model("ch_PP-OCRv4_det_infer.onnx"),
            "x",
            text_pages(calib_samples, 320, seed=8),
            text_pages(evaluate // 4, 320, seed=9),
            None,
            1,
            "iou",
        )
    )
    rec_calib, _ = text_lines(calib_samples, 320, seed=3, upright=True)
    rec_eval, _ = text_lines(evaluate // 2, 320, seed=4, upright=True)
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
    out.append(
        Task(
            "efficientnet_lite0",
            efficientnet_lite0(),
            "input",
            photo_crops(calib_samples, 224, seed=5),
            photo_crops(evaluate, 224, seed=6),
            None,
            1,
            "top1",
        )
    )
    out.append(
        Task(
            "minilm",
            minilm(),
            "ids",
            sentences(calib_samples),
            sentences(evaluate, last=True),
            None,
            1,
            "neighbour",
        )
    )
    return out
