"""--target-sqnr: the most harmful layers go back to float, fewest first, until the budget holds."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from qdq.config import QuantConfig, preset_config
from qdq.pipeline import quantize_model

from conftest import DIGITS, digits_cnn_sqnr, quantize_cnn


@pytest.mark.slow
def test_target_sqnr_keeps_the_fewest_harmful_layers_float(tmp_path, cnn_4bit_sqnr):
    budgeted, report = quantize_cnn(tmp_path, weight_bits=4, target_sqnr=30.0, gptq=False)
    kept = [d for d in report.kept_float if d.reason == "kept float to meet --target-sqnr"]
    assert 1 <= len(kept) < 4  # some layers, not all
    assert any(" met:" in note for note in report.notes)
    assert any("cost of the float layers" in note for note in report.notes)
    assert cnn_4bit_sqnr < 25
    assert digits_cnn_sqnr(budgeted) > 27  # measured on calibration data, holds on held-out data


def test_a_met_budget_changes_nothing(tmp_path):
    report = quantize_model(
        DIGITS / "cnn.onnx",
        tmp_path / "q.onnx",
        DIGITS / "calib.npz",
        QuantConfig(target_sqnr=20.0, max_samples=40),
    )
    assert not report.kept_float
    assert "kept float: none" in report.notes[-1]
    assert "on the first 40 calibration samples" in report.notes[-1]  # not BUDGET_SAMPLES


@pytest.mark.slow
def test_a_user_metric_can_set_the_budget(tmp_path):
    test = np.load(DIGITS / "test.npz")

    def accuracy(session) -> float:
        logits = session.run(None, {"input": test["input"]})[0]
        return float((logits.argmax(axis=1) == test["label"]).mean())

    out = tmp_path / "q.onnx"
    report = quantize_model(
        DIGITS / "cnn.onnx",
        out,
        DIGITS / "calib.npz",
        preset_config("default", weight_bits=3, target_sqnr=0.99),
        metric=accuracy,
    )
    assert any(" met:" in note for note in report.notes)
    assert accuracy(ort.InferenceSession(str(out))) >= 0.99
