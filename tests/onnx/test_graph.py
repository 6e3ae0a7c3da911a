"""A weight-only quantized model's DequantizeLinear of constants, folded into the float weights
ONNX Runtime computes from them, so that its layers can be quantized again."""

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from qdq.onnx.graph import dequantized_constants, hoisted_duplicates
from qdq.pipeline import quantize_model

from conftest import DIGITS

RNG = np.random.default_rng(0)


def _dequantizing() -> onnx.ModelProto:
    """Four DequantizeLinear nodes of constants, whose outputs are the graph's: int8 per tensor,
    int8 per channel on axis 0 with zero points, uint8 on axis 1 with zero points, and a
    blocked one (opset 21's `block_size`), which stays."""

    def const(name: str, array: np.ndarray) -> TensorProto:
        return numpy_helper.from_array(array, name)

    codes = RNG.integers(-128, 128, (6, 4, 3)).astype(np.int8)
    ucodes = RNG.integers(0, 256, (6, 4, 3)).astype(np.uint8)
    inits = [
        const("q", codes),
        const("s", np.float32(0.02)),
        const("s0", RNG.uniform(0.01, 0.1, 6).astype(np.float32)),
        const("z0", RNG.integers(-5, 5, 6).astype(np.int8)),
        const("uq", ucodes),
        const("s1", RNG.uniform(0.01, 0.1, 4).astype(np.float32)),
        const("z1", RNG.integers(100, 150, 4).astype(np.uint8)),
        const("sb", RNG.uniform(0.01, 0.1, (6, 2, 3)).astype(np.float32)),
    ]
    nodes = [
        helper.make_node("DequantizeLinear", ["q", "s"], ["per_tensor"]),
        helper.make_node("DequantizeLinear", ["q", "s0", "z0"], ["per_channel"], axis=0),
        helper.make_node("DequantizeLinear", ["uq", "s1", "z1"], ["unsigned"], axis=1),
        helper.make_node("DequantizeLinear", ["q", "sb"], ["blocked"], axis=1, block_size=2),
    ]
    outputs = ["per_tensor", "per_channel", "unsigned", "blocked"]
    graph = helper.make_graph(
        nodes,
        "dq",
        [],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in outputs],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    return model


def test_dequantized_constants_are_the_values_onnx_runtime_computes():
    model = _dequantizing()
    want = ort.InferenceSession(model.SerializeToString()).run(None, {})
    assert dequantized_constants(model) == 3
    assert [n.output[0] for n in model.graph.node] == ["blocked"]
    folded = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for name, values in zip(["per_tensor", "per_channel", "unsigned"], want, strict=False):
        assert folded[name].dtype == np.float32
        np.testing.assert_array_equal(folded[name], values)


def test_a_weight_only_quantized_cnn_is_quantized_again_with_int8_activations(tmp_path):
    """Its convolutions read DequantizeLinear outputs, which no constant folding removes: qdq
    had kept all three float ("weight is not a constant")."""
    model = onnx.load(str(DIGITS / "cnn.onnx"))
    inits = {t.name: t for t in model.graph.initializer}
    for node in [n for n in model.graph.node if n.op_type == "Conv"]:
        weight = numpy_helper.to_array(inits[node.input[1]])
        scale = np.abs(weight).max() / 127
        codes = np.round(weight / scale).astype(np.int8)
        model.graph.initializer.remove(inits[node.input[1]])
        model.graph.initializer.extend([
            numpy_helper.from_array(codes, f"{node.name}_codes"),
            numpy_helper.from_array(np.float32(scale), f"{node.name}_scale"),
        ])  # fmt: skip
        dq = helper.make_node(
            "DequantizeLinear", [f"{node.name}_codes", f"{node.name}_scale"], [node.input[1]]
        )
        model.graph.node.insert(0, dq)
    source = tmp_path / "weight_only.onnx"
    onnx.save(model, source)
    report = quantize_model(source, tmp_path / "q.onnx", DIGITS / "calib.npz")
    assert sum(d.quantized for d in report.decisions if d.op_type == "Conv") == 3
    assert any("folded 3 DequantizeLinear" in note for note in report.notes)
    assert report.output_sqnr["logits"] > 35


def test_a_weight_both_branches_of_an_if_hold_is_stored_once():
    """ONNX Runtime's constant folding gives each branch its own copy of a weight (Silero VAD's
    LSTM weights, three times each); the file keeps one, read by both branches."""
    weight = np.random.default_rng(0).standard_normal((16, 32)).astype(np.float32)

    def branch(name: str, op: str) -> onnx.GraphProto:
        node = helper.make_node(op, ["x", f"{name}_w"], [f"{name}_y"])
        out = helper.make_tensor_value_info(f"{name}_y", TensorProto.FLOAT, [16, 32])
        return helper.make_graph(
            [node], name, [], [out], [numpy_helper.from_array(weight, f"{name}_w")]
        )

    model = helper.make_model(
        helper.make_graph(
            [
                helper.make_node(
                    "If",
                    ["c"],
                    ["y"],
                    then_branch=branch("a", "Add"),
                    else_branch=branch("b", "Mul"),
                )
            ],
            "g",
            [
                helper.make_tensor_value_info("c", TensorProto.BOOL, []),
                helper.make_tensor_value_info("x", TensorProto.FLOAT, [16, 32]),
            ],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [16, 32])],
        ),
        opset_imports=[helper.make_opsetid("", 17)],
    )
    x = np.ones((16, 32), np.float32)
    before = ort.InferenceSession(model.SerializeToString())
    assert hoisted_duplicates(model) == 2
    onnx.checker.check_model(model)
    assert len(model.graph.initializer) == 1
    after = ort.InferenceSession(model.SerializeToString())
    for c in (True, False):
        feed = {"c": np.array(c), "x": x}
        np.testing.assert_array_equal(before.run(None, feed)[0], after.run(None, feed)[0])
