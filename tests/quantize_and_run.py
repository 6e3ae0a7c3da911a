"""Quantize a small model in a test's folder, run it in ONNX Runtime and compare it with FP32:
the steps tests/test_pipeline*.py share."""

from __future__ import annotations

import collections
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from qdq.config import QuantConfig
from qdq.pipeline import QuantizeReport, quantize_model

FUSED = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED


def run(path: Path | str, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def op_counts(model: onnx.ModelProto) -> collections.Counter:
    return collections.Counter(n.op_type for n in model.graph.node)


def quantize_on(
    source: Path, x: np.ndarray, folder: Path, config: QuantConfig | None = None
) -> tuple[Path, QuantizeReport]:
    """`source` quantized with `x` (saved as folder/x.npy) for calibration: (output, report)."""
    np.save(folder / "x.npy", x)
    out = folder / "q.onnx"
    return out, quantize_model(source, out, folder / "x.npy", config)


def save(model: onnx.ModelProto, folder: Path, name: str = "model.onnx") -> Path:
    path = folder / name
    onnx.save(model, str(path))
    return path


def sqnr_db(x: np.ndarray, y: np.ndarray) -> float:
    return float(10 * np.log10(np.sum(x.astype(np.float64) ** 2) / np.sum((x - y) ** 2.0)))
