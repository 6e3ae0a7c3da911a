"""--target-sqnr: the most harmful layers go back to float, fewest first, until the budget holds."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from qdq.graph.config import QuantConfig
from qdq.pipeline import quantize_model

DIGITS = Path(__file__).resolve().parents[1] / "examples" / "digits"


def held_out_sqnr(path: Path) -> float:
    x = np.load(DIGITS / "test.npz")["input"]
    want = ort.InferenceSession(str(DIGITS / "cnn.onnx")).run(None, {"input": x})[0]
    got = ort.InferenceSession(str(path)).run(None, {"input": x})[0]
    return float(10 * np.log10(np.sum(want.astype(np.float64) ** 2) / np.sum((want - got) ** 2)))


def test_target_sqnr_keeps_the_fewest_harmful_layers_float(tmp_path):
    plain, budgeted = tmp_path / "plain.onnx", tmp_path / "budget.onnx"
    quantize_model(DIGITS / "cnn.onnx", plain, DIGITS / "calib.npz", QuantConfig(weight_bits=4))
    report = quantize_model(
        DIGITS / "cnn.onnx",
        budgeted,
        DIGITS / "calib.npz",
        QuantConfig(weight_bits=4, target_sqnr=30.0),
    )
    kept = [d for d in report.kept_float if d.reason == "kept float to meet --target-sqnr"]
    assert 1 <= len(kept) < 4  # some layers, not all
    assert "met" in report.notes[-1]
    assert held_out_sqnr(plain) < 25
    assert held_out_sqnr(budgeted) > 27  # measured on calibration data, holds on held-out data


def test_a_met_budget_changes_nothing(tmp_path):
    report = quantize_model(
        DIGITS / "cnn.onnx",
        tmp_path / "q.onnx",
        DIGITS / "calib.npz",
        QuantConfig(target_sqnr=20.0),
    )
    assert not report.kept_float
    assert "kept float: none" in report.notes[-1]
