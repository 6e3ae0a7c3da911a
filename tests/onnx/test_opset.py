"""Opset upgrades keep what the model computes: ONNX's converter mended or refused where it
does not (an Upsample's pixel centres, a Hardmax's flattening)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from qdq.onnx.opset import converted, default_opset, upgrade_opset


def _model(node: onnx.NodeProto, opset: int, inits: list, shape: list) -> onnx.ModelProto:
    graph = helper.make_graph(
        [node],
        "old",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 5
    return model


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    return ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})[0]


@pytest.mark.parametrize(
    ("op", "opset", "mode", "scale"),
    [
        ("Upsample", 9, "linear", 2.0),
        ("Upsample", 9, "nearest", 2.5),
        ("Resize", 10, "linear", 1.7),
        ("Resize", 10, "nearest", 0.6),  # shrinking: ONNX Runtime rounds up
    ],
)
def test_an_old_resize_computes_what_it_did(op, opset, mode, scale):
    """The converter's Resize took opset 11's half-pixel centres: 0.3-0.9 off per pixel."""
    scales = numpy_helper.from_array(np.array([1, 1, scale, scale], np.float32), "s")
    model = _model(
        helper.make_node(op, ["x", "s"], ["y"], mode=mode), opset, [scales], [1, 2, 5, 7]
    )
    x = np.random.default_rng(0).standard_normal((1, 2, 5, 7)).astype(np.float32)
    upgraded = converted(model, 13)
    assert default_opset(upgraded) == 13
    np.testing.assert_array_equal(_run(upgraded, x), _run(model, x))


def test_an_old_hardmax_is_not_upgraded():
    """Before opset 13 a Hardmax flattens its input from `axis` on; kept at its opset (the
    converter's axis 1 had meant another axis: a 1 where FP32 has 0)."""
    model = _model(helper.make_node("Hardmax", ["x"], ["y"], axis=1), 12, [], [2, 3, 4])
    assert default_opset(upgrade_opset(model)) == 12


def test_an_old_model_whose_input_declares_no_shape_is_upgraded():
    """ONNX Runtime runs it; the converter, as ONNX's checker, wants a shape: it is given an
    empty one for the conversion, and none again after (it had been refused)."""
    model = _model(helper.make_node("Relu", ["x"], ["y"]), 9, [], [2, 3])
    model.graph.input[0].type.tensor_type.ClearField("shape")
    upgraded = upgrade_opset(model)
    assert default_opset(upgraded) == 13
    assert not upgraded.graph.input[0].type.tensor_type.HasField("shape")
