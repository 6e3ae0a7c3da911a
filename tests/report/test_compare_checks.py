"""`qdq compare` where a review found it wrong on what it measures: labels beside detections
an NMS kept, labels of a float16 output, a NaN layer in the worst-first table, outputs never
measured or of another type, and parts of an output whose batches differ in size."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from qdq.cli import main
from qdq.errors import ModelError
from qdq.metrics import ErrorStats
from qdq.report.checks import check_same_inputs
from qdq.report.compare import _worst_first


def kept_rows(folder: Path, threshold: float) -> Path:
    """x (N, 6) -> its rows whose first value passes `threshold`: (K, 6), K set by the data."""
    nodes = [helper.make_node("Gather", ["x", "zero"], ["c0"], axis=1),
             helper.make_node("Greater", ["c0", "t"], ["keep"]),
             helper.make_node("Compress", ["x", "keep"], ["dets"], axis=0)]  # fmt: skip
    constants = {"zero": np.int64(0), "t": np.float32(threshold)}
    graph = helper.make_graph(
        nodes, "rows", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 6])],
        [helper.make_tensor_value_info("dets", TensorProto.FLOAT, ["K", 6])],
        [numpy_helper.from_array(np.asarray(v), k) for k, v in constants.items()],
    )  # fmt: skip
    path = folder / f"rows{threshold}.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def test_labels_beside_rows_an_nms_kept_are_noted_not_scored(tmp_path, capsys):
    """Its first batch of one row looked like class scores: accuracy then broadcast 17
    detections against 40 labels (an internal error)."""
    rng = np.random.default_rng(8)
    x = rng.normal(size=(40, 6)).astype(np.float32)
    x[0, 0] = 1.0
    np.savez(tmp_path / "d.npz", x=x, label=rng.integers(0, 2, 40))
    model = kept_rows(tmp_path, 0.0)
    args = ["compare", str(model), str(kept_rows(tmp_path, 0.3)), "--data"]
    assert main([*args, str(tmp_path / "d.npz"), "--latency-runs", "0"]) == 0
    assert "labels were not scored" in capsys.readouterr().out
    parts = ["--output-parts", "dets:1:0-3,3-6", "--json"]
    assert main([*args, str(tmp_path / "d.npz"), "--latency-runs", "0", *parts]) == 0
    measured = json.loads(capsys.readouterr().out)
    assert all(p["batches_of_another_shape"] for p in measured["parts"].values())


@pytest.mark.parametrize("elem", [TensorProto.FLOAT16, TensorProto.DOUBLE])
def test_labels_beyond_a_float16_or_float64_outputs_classes_are_refused(tmp_path, capsys, elem):
    """Only a float32 output had been checked: others scored 0% without a word."""
    node = helper.make_node("Cast", ["x"], ["y"], to=elem)
    graph = helper.make_graph(
        [node], "scores", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 5])],
        [helper.make_tensor_value_info("y", elem, ["N", 5])],
    )  # fmt: skip
    path = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    x = np.random.default_rng(1).normal(size=(10, 5)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x, label=np.arange(5, 15) % 5 + 5)
    args = ["compare", str(path), str(path), "--data", str(tmp_path / "d.npz")]
    assert main([*args, "--latency-runs", "0"]) == 2
    assert "the first output has 5 classes" in capsys.readouterr().err


def test_a_nan_layer_sorts_last_and_an_unmeasured_output_claims_nothing():
    layers = {name: ErrorStats(signal=1.0, noise=noise) for name, noise in
              (("a", 0.001), ("b", float("nan")), ("c", 0.5), ("d", 0.01))}  # fmt: skip
    assert [n for n, _ in sorted(layers.items(), key=_worst_first)] == ["c", "d", "a", "b"]
    never = ErrorStats(unmatched=2).as_dict()
    assert never["sqnr_db"] is None
    assert never["cosine"] is None  # had been 1.0, a perfect match of nothing
    assert never["max_abs_error"] is None


def test_an_integer_output_against_a_float_one_is_refused():
    """A file ending in QuantizeLinear returns codes: they had been measured against FP32's
    values (-33.8 dB, top-1 100%)."""

    def model(elem: int) -> onnx.ModelProto:
        graph = helper.make_graph(
            [helper.make_node("Identity", ["x"], ["y"])], "m",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
            [helper.make_tensor_value_info("y", elem, ["N", 4])],
        )  # fmt: skip
        return helper.make_model(graph)

    with pytest.raises(ModelError, match="float32 in the float model and uint8 in the other"):
        check_same_inputs(model(TensorProto.FLOAT), model(TensorProto.UINT8))
    check_same_inputs(model(TensorProto.FLOAT), model(TensorProto.FLOAT16))  # widths may differ


def test_outputs_and_parts_never_measured_print_as_dashes_in_text_and_page():
    """An NMS's part whose every batch had another shape, and an integer output measured on
    some batches: the page had crashed formatting None, the text on the integer output."""
    from qdq.plan.part_stats import PartStats
    from qdq.plan.parts import Kind, Part
    from qdq.report.compare import Comparison
    from qdq.report.html import _parts

    part = PartStats(Part("dets", 1, 0, 3, Kind.VALUES))
    part.update(np.zeros((3, 6), np.float32), np.zeros((2, 6), np.float32))
    labels = ErrorStats(unmatched=1)
    labels.update(np.zeros((2, 3), np.int64), np.zeros((2, 3), np.int64))
    assert not labels.blank  # measured on the batch of FP32's shape
    outputs = {"dets": ErrorStats(unmatched=1), "labels": labels}
    c = Comparison(outputs=outputs, layers={}, samples=3, sizes=(1, 1),
                   parts={part.part.label: part})  # fmt: skip
    assert "equal to FP32's at 100.00%" in c.to_text()
    assert "<td class=num>—</td>" in _parts(c)


def test_labels_beside_an_integer_first_output_are_not_checked_as_classes():
    """A TopK's (N, 5) indices are no class scores (compare never scores them), yet labels
    past 4 had been refused as beyond 5 classes."""
    from qdq.report.checks import check_classes

    out = helper.make_tensor_value_info("top5", TensorProto.INT64, ["N", 5])
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 10])
    model = helper.make_model(helper.make_graph([], "g", [x], [out]))
    leading = (["top5"], [[np.tile(np.arange(5), (4, 1))]])
    check_classes(np.array([3, 7, 9, 1]), model, "labels", leading)  # no error
