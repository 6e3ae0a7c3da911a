"""An optional stage that fails on a model is skipped with a warning; the model is still made."""

from __future__ import annotations

import logging

import pytest

import qdq.pipeline
from qdq.errors import SchemeError
from qdq.pipeline import quantize_model

from conftest import DIGITS


def _fails(*args: object, **kwargs: object) -> None:
    raise RuntimeError("ONNX Runtime: graph.cc: Attempt to replace the existing tensor\nmore")


@pytest.mark.parametrize(
    ("target", "stage"),
    [
        ("qdq.ptq.correct_sequentially", "sequential bias correction"),
        ("qdq.ptq.correct_biases", "bias correction"),
        ("qdq.ptq.slow_pools", "the layout probe"),
        ("qdq.pipeline.smooth", "smoothing"),
        ("qdq.passes.gptq._accumulate", "GPTQ rounding"),
        ("qdq.ptq._correction_pays", "the correction check"),
    ],
)
def test_a_failing_optional_stage_is_skipped_named_and_reported(
    tmp_path, monkeypatch, caplog, target, stage
):
    monkeypatch.setattr(target, _fails)
    out = tmp_path / "q.onnx"
    with caplog.at_level(logging.WARNING, logger="qdq.ptq"):
        report = quantize_model(DIGITS / "transformer.onnx", out, DIGITS / "calib.npz")
    assert out.exists()
    skipped = [n for n in report.notes if n.startswith(f"skipped {stage}:")]
    assert len(skipped) == 1
    assert "Attempt to replace the existing tensor" in skipped[0]
    assert "more" not in skipped[0]  # one line
    assert [r.message for r in caplog.records] == skipped


def test_bad_input_in_an_optional_stage_is_still_an_error(tmp_path, monkeypatch):
    def refuses(*args: object, **kwargs: object) -> None:
        raise SchemeError("AdaRound needs the torch extra")

    monkeypatch.setattr(qdq.pipeline, "smooth", refuses)
    with pytest.raises(SchemeError, match="torch extra"):
        quantize_model(DIGITS / "transformer.onnx", tmp_path / "q.onnx", DIGITS / "calib.npz")
    assert not (tmp_path / "q.onnx").exists()
