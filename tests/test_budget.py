"""--target-sqnr: the most harmful layers go back to float, fewest first, until the budget holds."""

from __future__ import annotations

from qdq.graph.config import QuantConfig
from qdq.pipeline import quantize_model

from conftest import DIGITS, digits_cnn_sqnr


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
    assert digits_cnn_sqnr(plain) < 25
    assert digits_cnn_sqnr(budgeted) > 27  # measured on calibration data, holds on held-out data


def test_a_met_budget_changes_nothing(tmp_path):
    report = quantize_model(
        DIGITS / "cnn.onnx",
        tmp_path / "q.onnx",
        DIGITS / "calib.npz",
        QuantConfig(target_sqnr=20.0),
    )
    assert not report.kept_float
    assert "kept float: none" in report.notes[-1]
