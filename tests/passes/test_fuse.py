"""Graph rewrites: written-out HardSwish in two ops, not four; constant affine steps folded
into the Conv before them; residual sums before a LayerNorm as Sum. Same function, faster."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from qdq.onnx.model import ort_rewrite
from qdq.passes.fuse import fold_affine, fuse_hard_swish, sum_before_layer_norm
from qdq.pipeline import prepare, quantize_model


def written_out(order: str) -> onnx.ModelProto:
    """x -> Conv -> x * clip(x + 3, 0, 6) / 6 (as paddle2onnx writes it) -> Conv."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array((rng.standard_normal((4, 2, 3, 3)) * 2).astype(np.float32), "w"),
        numpy_helper.from_array(rng.standard_normal((3, 4, 1, 1)).astype(np.float32), "w2"),
        *(
            numpy_helper.from_array(np.array(v, np.float32), n)
            for n, v in (("three", 3.0), ("zero", 0.0), ("six", 6.0), ("sixth", 1 / 6))
        ),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["c", "three"], ["a"]),
        helper.make_node("Clip", ["a", "zero", "six"], ["r"]),
    ]
    if order == "mul-div":
        nodes += [
            helper.make_node("Mul", ["c", "r"], ["m"]),
            helper.make_node("Div", ["m", "six"], ["h"]),
        ]
    else:  # (clip * 1/6) * x
        nodes += [
            helper.make_node("Mul", ["sixth", "r"], ["m"]),
            helper.make_node("Mul", ["m", "c"], ["h"]),
        ]
    nodes.append(helper.make_node("Conv", ["h", "w2"], ["y"]))
    return graph_model(nodes, inits, out_channels=3)


def graph_model(nodes: list, inits: list, out_channels: int) -> onnx.ModelProto:
    """x (N, 2, 6, 6) -> nodes -> y (N, out_channels, 6, 6), opset 13."""
    graph = helper.make_graph(
        nodes,
        "rewrites",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", out_channels, 6, 6])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


@pytest.mark.parametrize("order", ["mul-div", "scale-mul"])
def test_written_out_hard_swish_becomes_two_ops_with_the_same_output(order):
    model = written_out(order)
    x = np.random.default_rng(1).standard_normal((8, 2, 6, 6)).astype(np.float32)
    before = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})[0]
    fused, count = fuse_hard_swish(onnx.ModelProto.FromString(model.SerializeToString()))
    assert count == 1
    ops = [n.op_type for n in fused.graph.node]
    assert ops == ["Conv", "HardSigmoid", "Mul", "Conv"]
    onnx.checker.check_model(fused)
    after = ort.InferenceSession(fused.SerializeToString()).run(None, {"x": x})[0]
    np.testing.assert_allclose(after, before, rtol=1e-5, atol=1e-5)


def test_six_divided_by_the_product_is_no_hard_swish():
    """Div(6, x * clip(x + 3, 0, 6)) has the 6 as its dividend: another function."""
    model = written_out("mul-div")
    div = next(n for n in model.graph.node if n.op_type == "Div")
    div.input[:] = ["six", "m"]
    _, count = fuse_hard_swish(model)
    assert count == 0


def test_a_constant_of_more_axes_than_x_is_no_hard_swish():
    """A 3 of shape (1, 1, 1, 1, 1) broadcasts the 4-D x to 5-D: HardSwish would not."""
    model = onnx.shape_inference.infer_shapes(written_out("mul-div"))
    three = next(t for t in model.graph.initializer if t.name == "three")
    three.CopyFrom(numpy_helper.from_array(np.full((1,) * 5, 3.0, np.float32), "three"))
    _, count = fuse_hard_swish(model)
    assert count == 0


def test_a_tensor_used_elsewhere_is_not_fused_away():
    model = written_out("mul-div")
    model.graph.output.append(helper.make_tensor_value_info("r", TensorProto.FLOAT, None))
    _, count = fuse_hard_swish(model)
    assert count == 0


def test_preparation_fuses_and_says_so():
    _, _, notes = prepare(written_out("mul-div"), per_channel=True)
    assert any("1 written-out HardSwish" in note for note in notes)


def conv_affine(scale: np.ndarray, shift: np.ndarray, bias: bool) -> onnx.ModelProto:
    """x -> Conv -> Mul(scale) -> Add(shift) -> Relu, as PP-OCRv4's MobileOne blocks write it."""
    rng = np.random.default_rng(2)
    inits = [
        numpy_helper.from_array(rng.standard_normal((4, 2, 3, 3)).astype(np.float32), "w"),
        numpy_helper.from_array(scale.astype(np.float32), "scale"),
        numpy_helper.from_array(shift.astype(np.float32), "shift"),
    ]
    conv_inputs = ["x", "w"]
    if bias:
        inits.append(numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "b"))
        conv_inputs.append("b")
    nodes = [
        helper.make_node("Conv", conv_inputs, ["c"], pads=[1, 1, 1, 1], name="conv"),
        helper.make_node("Mul", ["scale", "c"], ["m"]),
        helper.make_node("Add", ["m", "shift"], ["a"]),
        helper.make_node("Relu", ["a"], ["y"]),
    ]
    return graph_model(nodes, inits, out_channels=4)


@pytest.mark.parametrize(
    ("scale", "shift", "bias"),
    [
        (np.array([1.38]), np.array([0.59]), True),  # PP-OCRv4's scalar scale and shift
        (np.array([-0.5, 2.0, 1.0, 3.0]).reshape(4, 1, 1), np.zeros((1, 4, 1, 1)) + 0.1, False),
    ],
)
def test_constant_mul_and_add_after_a_conv_fold_into_it(scale, shift, bias):
    model = conv_affine(scale, shift, bias)
    x = np.random.default_rng(3).standard_normal((8, 2, 6, 6)).astype(np.float32)
    before = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})[0]
    folded, count = fold_affine(model)
    assert count == 2
    assert [n.op_type for n in folded.graph.node] == ["Conv", "Relu"]
    assert {t.name for t in folded.graph.initializer}.isdisjoint({"scale", "shift", "w"})
    onnx.checker.check_model(folded)
    after = ort.InferenceSession(folded.SerializeToString()).run(None, {"x": x})[0]
    np.testing.assert_allclose(after, before, rtol=1e-5, atol=1e-5)


def test_a_folded_models_constant_output_stays():
    """A constant the graph returns (a detector's anchors) is read by no node, and kept."""
    model = conv_affine(np.array([1.38]), np.array([0.59]), True)
    model.graph.initializer.append(numpy_helper.from_array(np.arange(3, dtype=np.float32), "k"))
    model.graph.output.append(helper.make_tensor_value_info("k", TensorProto.FLOAT, [3]))
    folded, count = fold_affine(model)
    assert count == 2
    x = np.zeros((1, 2, 6, 6), np.float32)
    anchors = ort.InferenceSession(folded.SerializeToString()).run(["k"], {"x": x})[0]
    np.testing.assert_array_equal(anchors, [0, 1, 2])


def test_a_spatially_varying_constant_is_not_folded():
    model = conv_affine(np.ones((1, 4, 6, 6)), np.zeros(1), True)
    folded, count = fold_affine(model)
    assert count == 0
    assert [n.op_type for n in folded.graph.node] == ["Conv", "Mul", "Add", "Relu"]


def test_a_constant_along_the_last_axis_is_not_folded():
    """(C,) broadcasts along the width of an (N, C, H, W) output, not along its channels."""
    _, count = fold_affine(conv_affine(np.arange(1.0, 7.0), np.zeros(1), True))
    assert count == 0


def residual_layer_norm(bias_add: bool) -> onnx.ModelProto:
    """x[N,8,16] -> MatMul (+ bias) -> Add(x, .) -> LayerNormalization: a transformer residual."""
    rng = np.random.default_rng(4)
    inits = [
        numpy_helper.from_array(rng.standard_normal((16, 16)).astype(np.float32), "w"),
        numpy_helper.from_array(rng.standard_normal(16).astype(np.float32), "b"),
        numpy_helper.from_array(np.ones(16, np.float32), "gamma"),
        numpy_helper.from_array(np.zeros(16, np.float32), "beta"),
    ]
    nodes = [helper.make_node("MatMul", ["x", "w"], ["m"])]
    branch = "m"
    if bias_add:
        nodes.append(helper.make_node("Add", ["m", "b"], ["mb"]))
        branch = "mb"
    nodes += [
        helper.make_node("Add", ["x", branch], ["s"]),
        helper.make_node("LayerNormalization", ["s", "gamma", "beta"], ["y"], axis=-1),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8, 16])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8, 16])
    graph = helper.make_graph(nodes, "g", [x], [y], inits)
    return onnx.shape_inference.infer_shapes(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    )


def fused_ops(model: onnx.ModelProto) -> set[str]:
    with_fusions = ort_rewrite(model, ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
    return {n.op_type for n in with_fusions.graph.node}


@pytest.mark.parametrize("bias_add", [False, True])
def test_a_residual_sum_before_layer_norm_escapes_the_slow_fusion(bias_add):
    model = residual_layer_norm(bias_add)
    x = np.random.default_rng(5).standard_normal((4, 8, 16)).astype(np.float32)
    before = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})[0]
    assert "SkipLayerNormalization" in fused_ops(model)
    rewritten, count = sum_before_layer_norm(model)
    assert count == 1  # the residual Add; a bias Add (one constant operand) stays
    assert "SkipLayerNormalization" not in fused_ops(rewritten)
    after = ort.InferenceSession(rewritten.SerializeToString()).run(None, {"x": x})[0]
    np.testing.assert_allclose(after, before, rtol=1e-5, atol=1e-5)  # fused kernels round apart


def test_a_fused_hard_swish_runs_as_an_int8_mul_once_quantized(tmp_path):
    source, data, out = tmp_path / "hs.onnx", tmp_path / "x.npy", tmp_path / "q.onnx"
    onnx.save(written_out("mul-div"), source)
    np.save(data, np.random.default_rng(2).standard_normal((64, 2, 6, 6)).astype(np.float32))
    report = quantize_model(source, out, data)
    assert all(d.quantized for d in report.decisions if d.op_type in ("HardSigmoid", "Mul"))
    fused = ort_rewrite(onnx.load(out), ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED)
    ops = [n.op_type for n in fused.graph.node]
    assert ops.count("QLinearMul") == 1  # before: a float Mul, "input is not float32"
    assert "Mul" not in ops


def test_a_float16_conv_keeps_float16_constants_when_folded():
    model = conv_affine(np.array([1.38]), np.array([0.59]), True)
    for tensor in model.graph.initializer:
        tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor).astype(np.float16),
                                                tensor.name))  # fmt: skip
    for value in (*model.graph.input, *model.graph.output):
        value.type.tensor_type.elem_type = TensorProto.FLOAT16
    x = np.random.default_rng(3).standard_normal((2, 2, 6, 6)).astype(np.float16)
    before = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})[0]
    folded, count = fold_affine(model)
    assert count == 2
    after = ort.InferenceSession(folded.SerializeToString()).run(None, {"x": x})[0]
    np.testing.assert_allclose(after, before, rtol=1e-2, atol=1e-2)


def test_folding_keeps_the_constants_a_branch_reads():
    """An initializer that only an If's branch reads is no unused initializer."""
    model = conv_affine(np.array([1.38]), np.array([0.59]), True)
    model.graph.initializer.append(numpy_helper.from_array(np.float32(2.0), "branch_only"))
    branches = [
        helper.make_graph([helper.make_node(op, ["y", "branch_only"], [f"{op}_out"])], op, [],
                          [helper.make_tensor_value_info(f"{op}_out", TensorProto.FLOAT, None)])
        for op in ("Add", "Sub")
    ]  # fmt: skip
    model.graph.node.extend([
        helper.make_node("ReduceMax", ["x"], ["peak"], keepdims=0),
        helper.make_node("Cast", ["peak"], ["positive"], to=TensorProto.BOOL),
        helper.make_node("If", ["positive"], ["z"], then_branch=branches[0],
                         else_branch=branches[1]),
    ])  # fmt: skip
    model.graph.output.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, None))
    x = np.random.default_rng(3).standard_normal((2, 2, 6, 6)).astype(np.float32)
    before = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})
    folded, count = fold_affine(model)
    assert count == 2
    after = ort.InferenceSession(folded.SerializeToString()).run(None, {"x": x})
    for want, got in zip(before, after, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
