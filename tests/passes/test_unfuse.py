"""ONNX Runtime's fused ops, as a model saved after its optimizations holds them, written back as
the ONNX ops they fuse: the same function, and the int8 rules then quantize them."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from qdq.passes.unfuse import unfuse
from qdq.pipeline import prepare, quantize_model
from quantize_and_run import sqnr_db

from conftest import DIGITS

RNG = np.random.default_rng(3)
X = RNG.normal(size=(2, 4, 8, 8)).astype(np.float32)


def _constant(name: str, *shape: int) -> onnx.TensorProto:
    return numpy_helper.from_array((RNG.normal(size=shape) * 0.3).astype(np.float32), name)


def _model(
    nodes: list, constants: list, opset: int = 17, x: tuple = X.shape, y: tuple | None = None
) -> onnx.ModelProto:
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x))]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, y)]
    graph = helper.make_graph(nodes, "g", inputs, outputs, constants)
    opsets = [helper.make_opsetid("", opset), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(graph, opset_imports=opsets)


def _convs(activation: onnx.NodeProto, opset: int = 17) -> onnx.ModelProto:
    """Conv -> `activation` (reading c1, writing a1) -> Conv without bias -> Relu."""
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
        activation,
        helper.make_node("Conv", ["a1", "w2"], ["c2"]),
        helper.make_node("Relu", ["c2"], ["y"]),
    ]
    constants = [_constant("w1", 8, 4, 3, 3), _constant("b1", 8), _constant("w2", 8, 8, 1, 1)]
    return _model(nodes, constants, opset)


def _clip(opset: int) -> onnx.NodeProto:
    if opset >= 11:
        return helper.make_node("Clip", ["c1", "lo", "hi"], ["a1"])
    return helper.make_node("Clip", ["c1"], ["a1"], min=0.0, max=6.0)


def _gemms(activation: str, **attrs: float) -> onnx.ModelProto:
    """Gemm -> activation -> MatMul by a constant, scaled by 0.5."""
    nodes = [
        helper.make_node("Gemm", ["x", "w1", "b1"], ["g"], transB=1),
        helper.make_node(activation, ["g"], ["a"], **attrs),
        helper.make_node("Transpose", ["w2"], ["w2t"], perm=[1, 0]),
        helper.make_node("MatMul", ["a", "w2t"], ["m"]),
        helper.make_node("Mul", ["m", "half"], ["y"]),
    ]
    constants = [_constant("w1", 6, 5), _constant("b1", 6), _constant("w2", 7, 6)]
    constants.append(numpy_helper.from_array(np.array(0.5, np.float32), "half"))
    return _model(nodes, constants, x=(3, 5))


CLIP_BOUNDS = [
    numpy_helper.from_array(np.array(v, np.float32), n) for n, v in (("lo", 0), ("hi", 6))
]
CASES = {
    "FusedConv Relu": _convs(helper.make_node("Relu", ["c1"], ["a1"])),
    "FusedConv LeakyRelu": _convs(helper.make_node("LeakyRelu", ["c1"], ["a1"], alpha=0.1)),
    "FusedConv HardSigmoid": _convs(helper.make_node("HardSigmoid", ["c1"], ["a1"], alpha=0.3)),
    "FusedConv Tanh": _convs(helper.make_node("Tanh", ["c1"], ["a1"])),
    "FusedConv Clip (inputs)": _convs(_clip(17)),
    "FusedConv Clip (attributes, opset 10)": _convs(_clip(10), opset=10),
    "FusedGemm LeakyRelu, FusedMatMul": _gemms("LeakyRelu", alpha=0.2),
    "FusedGemm Relu, FusedMatMul": _gemms("Relu"),
    "FusedGemm HardSigmoid, FusedMatMul": _gemms("HardSigmoid", alpha=0.3, beta=0.4),
    "FusedGemm Sigmoid, FusedMatMul": _gemms("Sigmoid"),
}
CASES["FusedConv Clip (inputs)"].graph.initializer.extend(CLIP_BOUNDS)


def _saved_by_onnx_runtime(model: onnx.ModelProto, tmp_path) -> onnx.ModelProto:
    """`model` as ONNX Runtime's extended optimizations save it (its fused ops in the file)."""
    source, target = tmp_path / "source.onnx", tmp_path / "saved.onnx"
    onnx.save(model, str(source))
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(target)
    ort.InferenceSession(str(source), options, providers=["CPUExecutionProvider"])
    return onnx.load(str(target))


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    options = ort.SessionOptions()  # as written: no fusion of the unfused ops again
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, ["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def _fused(model: onnx.ModelProto) -> Counter:
    return Counter(n.op_type for n in model.graph.node if n.domain == "com.microsoft")


@pytest.mark.parametrize("case", CASES)
def test_each_fused_op_is_written_as_the_onnx_ops_it_fuses(case, tmp_path):
    saved = _saved_by_onnx_runtime(CASES[case], tmp_path)
    fused = _fused(saved)
    assert sum(fused.values()) >= 1, f"ONNX Runtime fused nothing: {fused}"
    unfused, counts = unfuse(saved)
    assert counts == fused
    assert not _fused(unfused)
    onnx.checker.check_model(unfused)
    x = X if case.startswith("FusedConv") else X[0, 0, :3, :5]  # the Gemms read (3, 5)
    np.testing.assert_allclose(_run(unfused, x), _run(saved, x), rtol=1e-5, atol=1e-5)


def test_a_fused_convolution_adds_its_summand_before_the_activation():
    attrs = {"domain": "com.microsoft", "activation": "Relu", "pads": [1, 1, 1, 1]}
    nodes = [helper.make_node("FusedConv", ["x", "w", "", "z"], ["y"], **attrs)]
    model = _model(nodes, [_constant("w", 4, 4, 3, 3), _constant("z", 2, 4, 8, 8)])
    unfused, counts = unfuse(model)
    assert counts == {"FusedConv": 1}
    assert [n.op_type for n in unfused.graph.node] == ["Conv", "Add", "Relu"]
    np.testing.assert_allclose(_run(unfused, X), _run(model, X), rtol=1e-5, atol=1e-5)


def _skip_layer_norm(opset: int, outputs: list[str]) -> onnx.ModelProto:
    node = helper.make_node(
        "SkipLayerNormalization", ["x", "skip", "gamma", "beta", "bias"], outputs,
        domain="com.microsoft", epsilon=1e-5,
    )  # fmt: skip
    constants = [_constant("skip", 2, 3, 8), _constant("gamma", 8), _constant("beta", 8)]
    constants.append(_constant("bias", 8))
    model = _model([node], constants, opset, x=(2, 3, 8))
    if len(outputs) > 3 and outputs[3]:
        model.graph.output.append(
            helper.make_tensor_value_info(outputs[3], TensorProto.FLOAT, None)
        )
    return model


def test_a_skip_layer_norm_is_a_sum_and_a_layer_norm_and_gives_its_sum():
    model = _skip_layer_norm(17, ["y", "", "", "sum"])
    unfused, counts = unfuse(model)
    assert counts == {"SkipLayerNormalization": 1}
    assert [n.op_type for n in unfused.graph.node] == ["Add", "Add", "LayerNormalization"]
    x = RNG.normal(size=(2, 3, 8)).astype(np.float32)
    for got, want in zip(*(_outputs(m, x) for m in (unfused, model)), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(("opset", "outputs"), [(16, ["y"]), (17, ["y", "mean"])])
def test_a_skip_layer_norm_without_an_onnx_equivalent_stays_fused(opset, outputs):
    """LayerNormalization is opset 17; its mean output has no ONNX op to come from."""
    model = _skip_layer_norm(opset, outputs)
    assert unfuse(model) == (model, Counter())


def test_an_older_model_is_upgraded_for_its_skip_layer_norms_to_be_unfused():
    """At opset 16 a LayerNormalization cannot be written: the model goes to opset 17 first
    (a ViT-S at opset 14 through the transformer optimizer: 81.6 -> 70.2 ms int8)."""
    node = helper.make_node(
        "SkipLayerNormalization", ["h", "x", "gamma", "beta"], ["n"], domain="com.microsoft"
    )
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]), node]
    nodes.append(helper.make_node("MatMul", ["n", "w2"], ["y"]))
    constants = [_constant("w1", 8, 8), _constant("gamma", 8), _constant("beta", 8)]
    model = _model(nodes, [*constants, _constant("w2", 8, 4)], 16, x=(2, 3, 8), y=(2, 3, 4))
    prepared, _, notes = prepare(model, per_channel=True)
    assert "upgraded opset 16 to 17" in " ".join(notes)
    assert "LayerNormalization" in {n.op_type for n in prepared.graph.node}
    assert not _fused(prepared)
    x = RNG.normal(size=(2, 3, 8)).astype(np.float32)
    np.testing.assert_allclose(_outputs(prepared, x)[0], _outputs(model, x)[0], atol=1e-4)


def test_a_transposed_activation_stays_fused():
    """FusedMatMul(transA): the transpose's axes need the activation's rank."""
    node = helper.make_node("FusedMatMul", ["x", "w"], ["y"], domain="com.microsoft", transA=1)
    model = _model([node], [_constant("w", 3, 4)], x=(3, 5))
    assert unfuse(model) == (model, Counter())


def _outputs(model: onnx.ModelProto, x: np.ndarray) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})


def test_a_cnn_saved_by_onnx_runtime_is_quantized_as_its_source(tmp_path):
    """The digits CNN saved after ONNX Runtime's extended optimizations holds three FusedConv:
    1 of its 7 nodes was quantized (1.00x smaller); unfused, the file is the source's."""
    saved = tmp_path / "saved.onnx"
    onnx.save(_saved_by_onnx_runtime(onnx.load(str(DIGITS / "cnn.onnx")), tmp_path), str(saved))
    files, notes = {}, {}
    for name, source in (("saved", saved), ("source", DIGITS / "cnn.onnx")):
        files[name] = tmp_path / f"{name}_int8.onnx"
        report = quantize_model(source, files[name], DIGITS / "calib.npz")
        assert all(d.quantized for d in report.decisions if d.op_type == "Conv"), name
        notes[name] = " ".join(report.notes)
    assert "fused ops (3 FusedConv)" in notes["saved"]
    assert "fused ops" not in notes["source"]
    x = np.load(DIGITS / "test.npz")["input"][:64]
    got, want = (_outputs(onnx.load(str(files[n])), x)[0] for n in ("saved", "source"))
    with np.errstate(divide="ignore"):  # the same file, so far: an infinite SQNR
        assert sqnr_db(want, got) > 40
