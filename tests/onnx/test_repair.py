"""Models ONNX Runtime runs but ONNX's tools stop at: nodes out of order are sorted as ONNX
Runtime sorts them; a cycle stays an error that says what is wrong."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from qdq.errors import ModelError
from qdq.onnx.model import load_model
from qdq.onnx.repair import typed


def _chain(order: list[int], cycle: bool = False) -> onnx.ModelProto:
    """x -> Relu -> Neg -> Abs -> y, its nodes written in `order`; with `cycle`, the Relu reads
    the Abs's output too."""
    nodes = [
        helper.make_node("Add" if cycle else "Relu", ["x", "c"] if cycle else ["x"], ["a"]),
        helper.make_node("Neg", ["a"], ["b"]),
        helper.make_node("Abs", ["b"], ["y" if not cycle else "c"]),
    ]
    if cycle:
        nodes.append(helper.make_node("Identity", ["c"], ["y"]))
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])
    graph = helper.make_graph([nodes[i] for i in order], "g", [x], [y])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_nodes_out_of_order_are_sorted_as_onnx_runtime_sorts_them(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(_chain([2, 0, 1]), str(path))
    x = np.array([-1.0, 2.0], np.float32)
    want = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    model = load_model(path)
    assert [n.op_type for n in model.graph.node] == ["Relu", "Neg", "Abs"]
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    np.testing.assert_array_equal(session.run(None, {"x": x})[0], want[0])


def test_a_cycle_is_refused_in_one_line(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(_chain([0, 1, 2, 3], cycle=True), str(path))
    with pytest.raises(ModelError, match="is not a valid ONNX model"):
        load_model(path)


def test_outputs_onnx_runtime_cannot_type_stay_untyped():
    """A custom op ONNX Runtime does not know: its session fails, and the model is left as it
    is for the stage that runs it to say why."""
    node = helper.make_node("Mystery", ["x"], ["m"], domain="example.custom")
    graph = helper.make_graph(
        [node, helper.make_node("Relu", ["m"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
    )
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("example.custom", 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    assert typed(model) is model
    assert not model.graph.value_info
