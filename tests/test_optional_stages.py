"""An optional stage that fails on a model is skipped with a warning; the model is still made."""

from __future__ import annotations

import logging
import warnings

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

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


def _unbatched_model(first: onnx.ValueInfoProto) -> onnx.ModelProto:
    """`first`, then x[2, 8] (each sample two rows), -> Gemm -> Relu -> Gemm -> * gain."""
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], name="fc1"),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("Gemm", ["r", "w2", "b2"], ["m"], name="fc2"),
        helper.make_node("Mul", ["m", "gain"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "unbatched",
        [first, helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 6])],
        [
            numpy_helper.from_array(rng.standard_normal((8, 16)).astype(np.float32), "w1"),
            numpy_helper.from_array(rng.standard_normal((16, 6)).astype(np.float32), "w2"),
            numpy_helper.from_array(rng.standard_normal(16).astype(np.float32), "b1"),
            numpy_helper.from_array(rng.standard_normal(6).astype(np.float32), "b2"),
        ],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_stages_count_samples_whose_leading_axis_is_no_batch(tmp_path):
    """A scalar first input (a gain) and an input whose leading axis is fixed at 2: each feed
    holds one sample. The scalar's len() had skipped the method choice, and the fixed axis
    counted each sample twice (the correction's running mean over half-empty slices: NaN)."""
    gain = helper.make_tensor_value_info("gain", TensorProto.FLOAT, [])
    onnx.save(_unbatched_model(gain), tmp_path / "m.onnx")
    x = np.random.default_rng(1).standard_normal((24, 2, 8)).astype(np.float32)
    np.savez(tmp_path / "calib.npz", gain=np.ones(24, np.float32), x=x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # numpy's "Mean of empty slice" among them
        report = quantize_model(tmp_path / "m.onnx", tmp_path / "q.onnx", tmp_path / "calib.npz")
    assert not [n for n in report.notes if n.startswith("skipped")], report.notes
    assert any(
        n.startswith("range method") and "on 6 calibration samples" in n for n in report.notes
    )
    assert any(n.startswith("sequential bias correction") for n in report.notes)
