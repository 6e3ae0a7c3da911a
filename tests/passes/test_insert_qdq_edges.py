"""The rewrite on graphs of unusual shape, where a review found ONNX Runtime running a layer
float that qdq had planned int8, a file that did not load, or an interface changed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from qdq.config import QuantConfig
from qdq.errors import ModelError
from qdq.onnx.sessions import open_session
from qdq.pipeline import quantize_model

F = TensorProto.FLOAT
INT8 = QuantConfig(method="minmax", prefer="int8", gptq=False, sequential_bias_correction=False)


def conv(name: str, x: str, y: str, weight: str) -> onnx.NodeProto:
    return helper.make_node("Conv", [x, weight], [y], name=name, pads=[1, 1, 1, 1])


def weights(*names: str, channels: int = 4) -> list[onnx.TensorProto]:
    rng = np.random.default_rng(0)
    return [
        numpy_helper.from_array(
            (rng.standard_normal((channels, channels, 3, 3)) * 0.3).astype(np.float32), name
        )
        for name in names
    ]


def quantized(tmp_path: Path, nodes: list, inputs: list, outputs: list, inits: list) -> tuple:
    """The model quantized all int8 on 24 random samples; (the file, the op types ONNX Runtime
    runs it with)."""
    model = helper.make_model(
        helper.make_graph(nodes, "edges", inputs, outputs, inits),
        opset_imports=[helper.make_opsetid("", 17)],
    )
    onnx.save(model, tmp_path / "m.onnx")
    rng = np.random.default_rng(1)
    data = {}
    for value in inputs:  # a scalar input: one value per sample
        dims = [d.dim_value or 24 for d in value.type.tensor_type.shape.dim] or [24]
        values = rng.standard_normal(dims)
        bool_input = value.type.tensor_type.elem_type == TensorProto.BOOL
        data[value.name] = values > 0 if bool_input else (np.abs(values) + 1).astype(np.float32)
        if value.type.tensor_type.shape.dim:  # an image: signed values
            data[value.name] = values.astype(np.float32)
    np.savez(tmp_path / "x.npz", **data)
    quantize_model(tmp_path / "m.onnx", tmp_path / "q.onnx", tmp_path / "x.npz", INT8)
    optimized = tmp_path / "optimized.onnx"
    open_session(str(tmp_path / "q.onnx"), optimized_path=optimized)
    return onnx.load(tmp_path / "q.onnx"), [n.op_type for n in onnx.load(optimized).graph.node]


def image(name: str, channels: int = 4) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, F, ["N", channels, 8, 8])


def test_a_branch_reading_a_kernels_output_reads_its_dequantized_copy(tmp_path):
    """An If kept (its condition varies) whose branches read conv1's Relu output: they had
    read the float tensor, so conv1 ran float and its Q/DQ pair was left unread."""
    branches = [
        helper.make_graph([helper.make_node(op, ["r1", "r1"], [f"{op}_out"])], op, [],
                          [helper.make_tensor_value_info(f"{op}_out", F, None)])
        for op in ("Add", "Mul")
    ]  # fmt: skip
    nodes = [
        conv("conv1", "x", "c1", "w1"),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("If", ["flag"], ["b"], name="branch", then_branch=branches[0],
                         else_branch=branches[1]),
        conv("conv2", "b", "y", "w2"),
    ]  # fmt: skip
    flag = helper.make_tensor_value_info("flag", TensorProto.BOOL, [])
    _, ops = quantized(tmp_path, nodes, [image("x"), flag], [image("y")], weights("w1", "w2"))
    assert ops.count("QLinearConv") == 2, ops


@pytest.mark.parametrize("case", ["concat", "clip with a computed max"])
def test_an_absorbed_activation_leaves_its_producer_fused(tmp_path, case):
    """A Relu absorbed into its Conv, whose output a Concat then gave its own grid (zero point
    85, not the lowest code), and a Clip(0, max) absorbed although its max is computed: ONNX
    Runtime kept the activation, and the Conv ran float."""
    if case == "concat":
        nodes = [
            conv("conv1", "x", "c1", "w1"),
            helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
            helper.make_node("Concat", ["r1", "x"], ["cat"], axis=1, name="cat"),
            conv("conv2", "cat", "y", "w2"),
        ]
        inits = [*weights("w1"), *weights("w2", channels=8)[:1]]
        inits[1] = numpy_helper.from_array(np.ones((4, 8, 3, 3), np.float32) * 0.1, "w2")
        inputs = [image("x")]
    else:
        nodes = [
            conv("conv1", "x", "c1", "w1"),
            helper.make_node("Clip", ["c1", "zero", "high"], ["r1"], name="clip"),
            conv("conv2", "r1", "y", "w2"),
        ]
        inits = [*weights("w1", "w2"), numpy_helper.from_array(np.float32(0), "zero")]
        inputs = [image("x"), helper.make_tensor_value_info("high", F, [])]
    _, ops = quantized(tmp_path, nodes, inputs, [image("y")], inits)
    assert ops.count("QLinearConv") == 2, ops


def test_a_gemm_bias_of_one_row_is_int32(tmp_path):
    """C of shape (1, N) broadcasts as (N,) does: it had stayed float, and so had the Gemm."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array((rng.standard_normal((8, 6)) * 0.3).astype(np.float32), "w"),
        numpy_helper.from_array(rng.standard_normal((1, 6)).astype(np.float32), "c"),
    ]
    nodes = [
        helper.make_node("Gemm", ["x", "w", "c"], ["g"], name="gemm"),
        helper.make_node("Relu", ["g"], ["y"], name="relu"),
    ]
    x = helper.make_tensor_value_info("x", F, ["N", 8])
    y = helper.make_tensor_value_info("y", F, ["N", 6])
    _, ops = quantized(tmp_path, nodes, [x], [y], inits)
    assert "QGemm" in ops, ops


def test_new_names_never_repeat_the_models(tmp_path):
    """Weight A of node x_n and weight A_x of node n both had stem A_x_n_1, and the file did
    not load."""
    nodes = [
        helper.make_node("Conv", ["x", "A"], ["c1"], name="x_n", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu"),
        helper.make_node("Conv", ["r1", "A_x"], ["y"], name="n", pads=[1, 1, 1, 1]),
    ]
    model, ops = quantized(tmp_path, nodes, [image("x")], [image("y")], weights("A", "A_x"))
    assert ops.count("QLinearConv") == 2, ops
    names = [t.name for t in model.graph.initializer]
    assert len(names) == len(set(names))


def test_an_input_returned_unshaped_keeps_its_shape_as_an_input(tmp_path):
    nodes = [conv("conv1", "x", "y", "w1")]
    outputs = [image("y"), onnx.ValueInfoProto(name="x")]
    outputs[1].type.tensor_type.elem_type = F
    model, _ = quantized(tmp_path, nodes, [image("x")], outputs, weights("w1"))
    assert model.graph.input[0].type.tensor_type.HasField("shape")
    assert not model.graph.output[1].type.tensor_type.HasField("shape")


def test_an_output_listed_twice_is_refused_in_one_line(tmp_path):
    nodes = [conv("conv1", "x", "y", "w1")]
    with pytest.raises(ModelError, match="more than once"):
        quantized(tmp_path, nodes, [image("x")], [image("y"), image("y")], weights("w1"))


def test_a_qoperator_file_keeps_an_unshaped_output_unshaped(tmp_path):
    """ONNX Runtime's rewrite into QOperator ops infers shapes again: the output declared
    without one had come out as [N, 4, 8, 8]."""
    model = helper.make_model(
        helper.make_graph([conv("conv1", "x", "y", "w1")], "qop", [image("x")],
                          [onnx.ValueInfoProto(name="y")], weights("w1")),
        opset_imports=[helper.make_opsetid("", 17)],
    )  # fmt: skip
    model.graph.output[0].type.tensor_type.elem_type = F
    onnx.save(model, tmp_path / "m.onnx")
    np.save(
        tmp_path / "x.npy",
        np.random.default_rng(1).standard_normal((24, 4, 8, 8)).astype(np.float32),
    )
    quantize_model(tmp_path / "m.onnx", tmp_path / "q.onnx", tmp_path / "x.npy", INT8,
                   output_format="qoperator")  # fmt: skip
    written = onnx.load(tmp_path / "q.onnx")
    assert not written.graph.output[0].type.tensor_type.HasField("shape")
    assert any(n.op_type == "QLinearConv" for n in written.graph.node)
