"""Evaluation keeps one batch's tensors within a memory budget, with the same measurements."""

from __future__ import annotations

import pytest

import qdq.report.compare as compare_module
from qdq.metrics import ErrorStats
from qdq.pipeline import quantize_model
from qdq.report.compare import compare_models

from conftest import DIGITS


def test_evaluation_batches_shrink_to_the_memory_budget_and_measure_the_same(tmp_path, monkeypatch):
    quantized = tmp_path / "q.onnx"
    quantize_model(DIGITS / "cnn.onnx", quantized, DIGITS / "calib.npz")
    args = (DIGITS / "cnn.onnx", quantized, DIGITS / "test.npz")
    lengths: list[int] = []
    update = ErrorStats.update

    def recorded(self, reference, quantized, *rest):
        lengths.append(len(reference))
        return update(self, reference, quantized, *rest)

    monkeypatch.setattr(ErrorStats, "update", recorded)
    roomy = compare_models(*args, batch_size=32, latency_runs=0)
    assert max(lengths) == 32
    lengths.clear()
    monkeypatch.setattr(compare_module, "EVAL_BUDGET", 1)  # below one sample: batches of one
    tight = compare_models(*args, batch_size=32, latency_runs=0)
    assert set(lengths) == {1}
    assert tight.samples == roomy.samples == 540
    assert tight.accuracy == roomy.accuracy
    for name, stats in roomy.layers.items():
        assert tight.layers[name].sqnr_db == pytest.approx(stats.sqnr_db, rel=1e-9)
    for name, stats in roomy.outputs.items():
        assert tight.outputs[name].sqnr_db == pytest.approx(stats.sqnr_db, rel=1e-9)
