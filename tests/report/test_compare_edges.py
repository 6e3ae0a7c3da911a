"""`qdq compare` where a review found its numbers wrong: class agreement of boxes, an output
whose size the data sets, float16 outputs, NaN and all-zero references."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from qdq.cli import main
from qdq.config import QuantConfig
from qdq.metrics import ErrorStats
from qdq.pipeline import quantize_model
from qdq.report.compare import compare_models


def _saved(folder: Path, nodes: list, inits: dict, outputs: list, name: str) -> Path:
    graph = helper.make_graph(
        nodes,
        name,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
        outputs,
        [numpy_helper.from_array(np.asarray(v, np.float32), k) for k, v in inits.items()],
    )
    path = folder / f"{name}.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def _quantized(folder: Path, model: Path) -> tuple[Path, Path, Path]:
    rng = np.random.default_rng(5)
    np.savez(folder / "calib.npz", x=rng.normal(size=(64, 8)).astype(np.float32))
    np.savez(folder / "test.npz", x=rng.normal(size=(200, 8)).astype(np.float32))
    out = folder / f"{model.stem}_int8.onnx"
    args = [model, "-o", out, "--calib", folder / "calib.npz", "--prefer", "int8"]
    assert main(["quantize", *map(str, args)]) == 0
    return model, out, folder / "test.npz"


def test_boxes_beside_scores_get_no_class_agreement(tmp_path):
    """A 2-D [cx, cy, w, h | 3 scores] head: an argmax over box coordinates is no class, and
    neither is one over the whole joined output (both had been reported as top-1)."""
    rng = np.random.default_rng(0)
    inits = {"W1": rng.normal(size=(8, 16)) * 0.5, "W2": rng.normal(size=(16, 4)) * 0.5,
             "W3": rng.normal(size=(16, 3)) * 0.8, "s": [40, 40, 10, 10], "o": [100, 100, 5, 5],
             "one": [1.0]}  # fmt: skip
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["a"]),
        helper.make_node("Relu", ["a"], ["r"]),
        helper.make_node("MatMul", ["r", "W2"], ["b0"]),
        helper.make_node("Mul", ["b0", "s"], ["b1"]),
        helper.make_node("Add", ["b1", "o"], ["b2"]),
        helper.make_node("Abs", ["b2"], ["boxes"]),
        helper.make_node("MatMul", ["r", "W3"], ["c0"]),
        helper.make_node("Sub", ["c0", "one"], ["c1"]),
        helper.make_node("Sigmoid", ["c1"], ["scores"]),
        helper.make_node("Concat", ["boxes", "scores"], ["det"], axis=-1),
    ]
    det = helper.make_tensor_value_info("det", TensorProto.FLOAT, ["N", 7])
    result = compare_models(*_quantized(tmp_path, _saved(tmp_path, nodes, inits, [det], "det")),
                            latency_runs=0)  # fmt: skip
    parts = result.as_dict()["parts"]
    assert "det[:, 0:4]" in parts
    assert "top1_agreement" not in parts["det[:, 0:4]"]
    assert "top1_agreement" not in result.as_dict()["outputs"]["det"]
    assert "det[:, 0:4]' (boxes): SQNR" in result.to_text()


def test_an_output_whose_size_the_data_sets_is_measured_where_it_can_be(tmp_path):
    """NonZero's count moved under int8: that output's batches of another shape are left out
    (compare had ended on them, blaming the user's models), the others measured."""
    rng = np.random.default_rng(0)
    inits = {"W1": rng.normal(size=(8, 32)) * 0.4, "W2": rng.normal(size=(32, 8)) * 0.4,
             "t": [0.5]}  # fmt: skip
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["a"]),
        helper.make_node("Relu", ["a"], ["r"]),
        helper.make_node("MatMul", ["r", "W2"], ["y"]),
        helper.make_node("Greater", ["y", "t"], ["g"]),
        helper.make_node("NonZero", ["g"], ["where"]),
    ]
    outputs = [
        helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8]),
        helper.make_tensor_value_info("where", TensorProto.INT64, [2, "K"]),
    ]
    model, quantized, data = _quantized(tmp_path, _saved(tmp_path, nodes, inits, outputs, "var"))
    result = compare_models(model, quantized, data, latency_runs=0)
    assert result.outputs["y"].sqnr_db > 20
    assert result.outputs["where"].unmatched > 0
    assert "of another shape than FP32's" in result.to_text()


def test_a_nan_error_stays_nan_and_an_all_zero_reference_shares_no_direction():
    stats = ErrorStats()
    stats.update(np.array([1.0, np.nan, 3.0]), np.array([7.0, 1.0, 3.0]))
    assert np.isnan(stats.max_abs)  # a finite 6 beside it had been reported alone
    zero = ErrorStats()
    zero.update(np.zeros(4), np.ones(4))
    assert zero.cosine == 0.0  # it had been 1
    both = ErrorStats()
    both.update(np.zeros(4), np.zeros(4))
    assert both.cosine == 1.0


@pytest.mark.parametrize("dtype", [TensorProto.FLOAT16])
def test_a_float16_output_is_judged_by_its_parts(tmp_path, dtype):
    """Its parts, F1 and readings had been dropped: only float32 outputs were looked at."""
    rng = np.random.default_rng(0)
    inits = {"W": rng.normal(size=(8, 6))}
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["p"], axis=-1),
        helper.make_node("Cast", ["p"], ["probs"], to=dtype),
    ]
    out = helper.make_tensor_value_info("probs", dtype, ["N", 6])
    result = compare_models(*_quantized(tmp_path, _saved(tmp_path, nodes, inits, [out], "half")),
                            latency_runs=0, declared=["probs:1:0-3,3-6"])  # fmt: skip
    assert list(result.parts) == ["probs[:, 0:3]", "probs[:, 3:6]"]


def test_a_model_whose_output_rows_the_data_sets_quantizes(tmp_path):
    """Boxes kept by their score (an NMS's Compress), a sample at a time: a sample with none
    gives (0, 6), and every stage runs. Its Slice bounds are Constant nodes of `value_ints`
    (data-free's BatchNorm scan had read every Constant's first attribute as a tensor: an
    internal error on any such model)."""
    rng = np.random.default_rng(0)
    inits = {"W1": rng.normal(size=(8, 16)) * 0.5, "b1": rng.normal(size=16), "t": [0.5],
             "W2": rng.normal(size=(16, 6)) * 0.5, "s": [40, 40, 10, 10, 1, 1]}  # fmt: skip
    bounds = [helper.make_node("Constant", [], [n], value_ints=[v]) for n, v in
              (("four", 4), ("five", 5), ("one", 1))]  # fmt: skip
    nodes = [
        *bounds,
        helper.make_node("MatMul", ["x", "W1"], ["a0"]),
        helper.make_node("Add", ["a0", "b1"], ["a"]),
        helper.make_node("Relu", ["a"], ["r"]),
        helper.make_node("MatMul", ["r", "W2"], ["m"]),
        helper.make_node("Sigmoid", ["m"], ["p"]),
        helper.make_node("Mul", ["p", "s"], ["rows"]),
        helper.make_node("Slice", ["p", "four", "five", "one"], ["score"]),
        helper.make_node("Flatten", ["score"], ["flat"], axis=0),
        helper.make_node("Squeeze", ["flat"], ["sv"]),
        helper.make_node("Greater", ["sv", "t"], ["keep"]),
        helper.make_node("Compress", ["rows", "keep"], ["det"], axis=0),
    ]
    det = helper.make_tensor_value_info("det", TensorProto.FLOAT, ["K", 6])
    model = _saved(tmp_path, nodes, inits, [det], "nms")
    np.savez(tmp_path / "calib.npz", x=rng.normal(size=(64, 8)).astype(np.float32))
    report = quantize_model(model, tmp_path / "q.onnx", tmp_path / "calib.npz",
                            QuantConfig(batch_size=1))  # fmt: skip
    assert not [n for n in report.notes if n.startswith("skipped")], report.notes
    assert report.output_sqnr["det"] > 30
