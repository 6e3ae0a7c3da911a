"""Cross-layer equalization and bias absorption: function unchanged, ranges equal, ReLU6 caps
respected, per-tensor INT8 rescued."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from qdq.config import preset_config
from qdq.onnx.graph import GraphIndex
from qdq.passes.datafree import Moments, batchnorm_moments
from qdq.passes.equalize import equalize, find_pairs
from qdq.pipeline import prepare, quantize_model

from conftest import DIGITS


def skewed_depthwise_model(seed: int = 0) -> onnx.ModelProto:
    """The bundled depthwise digits model with ReLU for ReLU6, then each conv pair's channels
    rescaled by random factors 10^U(-1.5, 1.5) across the ReLU: the same function, but channel
    ranges that differ 1000-fold, as BatchNorm folding leaves real depthwise networks."""
    model, _, _ = prepare(onnx.load(str(DIGITS / "mobilenet.onnx")), per_channel=True)
    for node in model.graph.node:
        if node.op_type == "Clip":
            node.op_type = "Relu"
            del node.input[1:]
    used = {name for node in model.graph.node for name in node.input}
    kept = [t for t in model.graph.initializer if t.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    rng = np.random.default_rng(seed)
    inits = {t.name: t for t in model.graph.initializer}
    for pair in find_pairs(GraphIndex(model)):
        first, second = pair.first, pair.second
        w1, b1, w2 = (numpy_helper.to_array(inits[n]) for n in (*first.input[1:3], second.input[1]))
        c = 10 ** rng.uniform(-1.5, 1.5, w1.shape[0])
        into = c.reshape(-1, 1, 1, 1) if w2.shape[1] == 1 else c.reshape(1, -1, 1, 1)
        for name, array in zip(
            (*first.input[1:3], second.input[1]),
            (w1 * c.reshape(-1, 1, 1, 1), b1 * c, w2 / into),
            strict=True,
        ):
            inits[name].CopyFrom(numpy_helper.from_array(array.astype(np.float32), name))
    return model


def accuracy(path: Path) -> float:
    with np.load(DIGITS / "test.npz") as test:
        logits = ort.InferenceSession(str(path)).run(None, {"input": test["input"]})[0]
        return float((logits.argmax(axis=1) == test["label"]).mean())


def test_equalization_keeps_the_function_and_equalizes_ranges():
    model = skewed_depthwise_model()
    x = np.load(DIGITS / "calib.npz")["input"][:64]
    before = ort.InferenceSession(model.SerializeToString()).run(None, {"input": x})[0]
    equalized, result = equalize(model)
    after = ort.InferenceSession(equalized.SerializeToString()).run(None, {"input": x})[0]
    assert len(result.divided) == 6
    np.testing.assert_allclose(after, before, rtol=1e-4, atol=1e-4)
    inits = {t.name: numpy_helper.to_array(t) for t in equalized.graph.initializer}
    for pair in find_pairs(GraphIndex(equalized)):
        w1, w2 = inits[pair.first.input[1]], inits[pair.second.input[1]]
        r1 = np.abs(w1).reshape(len(w1), -1).max(axis=1)
        by_input = w2 if w2.shape[1] == 1 else np.swapaxes(w2, 0, 1)
        r2 = np.abs(by_input).reshape(len(by_input), -1).max(axis=1)
        np.testing.assert_allclose(r1, r2, rtol=1e-3)


@pytest.mark.parametrize("bias_correction", [False, True])
def test_cle_rescues_per_tensor_int8_of_a_depthwise_network(tmp_path, bias_correction):
    source = tmp_path / "skewed.onnx"
    onnx.save(skewed_depthwise_model(), str(source))
    float_accuracy = accuracy(source)
    plain, rescued = tmp_path / "plain.onnx", tmp_path / "cle.onnx"
    # Every layer int8 (--prefer balanced keeps the worst float at no cost on this tiny model).
    config = preset_config(
        "default", per_channel=False, bias_correction=bias_correction, prefer="speed"
    )
    quantize_model(source, plain, DIGITS / "calib.npz", config)
    config = preset_config(
        "default", per_channel=False, bias_correction=bias_correction, equalize=True
    )
    quantize_model(source, rescued, DIGITS / "calib.npz", config)
    assert accuracy(plain) < 0.5  # collapses, as in the DFQ paper's MobileNetV2 per-layer INT8
    assert accuracy(rescued) >= float_accuracy - 0.01


def _constant(name: str, inits: dict, constants: dict) -> onnx.TensorProto:
    return inits[name] if name in inits else constants[name].attribute[0].t


def run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    return ort.InferenceSession(model.SerializeToString()).run(None, {"input": x})[0]


def test_equalization_across_relu6_stays_within_the_cap():
    """Across Clip(0, 6), channels that may reach 6 keep their scale and the others move only
    as far as keeps them under it: the function is unchanged on real data."""
    original = onnx.load(str(DIGITS / "mobilenet_bn.onnx"))
    moments = batchnorm_moments(original)
    model, _, _ = prepare(original, per_channel=True)
    x = np.load(DIGITS / "calib.npz")["input"][:128]
    before = run(model, x)
    equalized, result = equalize(model, moments)
    assert result.capped_pairs == 6
    assert any(np.ptp(np.log(f)) > 0.3 for f in result.divided.values())
    np.testing.assert_allclose(run(equalized, x), before, rtol=1e-4, atol=1e-4)
    assert sum(n.op_type == "Clip" for n in equalized.graph.node) == 7  # ReLU6 kept


def test_without_statistics_relu6_pairs_are_left_alone():
    model, _, _ = prepare(onnx.load(str(DIGITS / "mobilenet_bn.onnx")), per_channel=True)
    _, result = equalize(model)
    assert result.divided == {}
    assert result.capped_pairs == 0


def test_bias_absorption_shifts_relu_inputs_into_unpadded_convs():
    """The depthwise model with ReLU for ReLU6 and every BatchNorm's beta raised by 4 gamma in
    half its channels: absorption moves max(0, mean - 4 std) out of those channels into the
    following 1x1 conv's bias, and the outputs stay (nearly) equal."""
    original = onnx.load(str(DIGITS / "mobilenet_bn.onnx"))
    inits = {t.name: t for t in original.graph.initializer}
    constants = {n.output[0]: n for n in original.graph.node if n.op_type == "Constant"}
    for node in original.graph.node:
        if node.op_type == "Clip":
            node.op_type = "Relu"
            del node.input[1:]
        if node.op_type == "BatchNormalization":
            gamma, beta = (_constant(name, inits, constants) for name in node.input[1:3])
            raised = numpy_helper.to_array(beta) + 4 * np.abs(numpy_helper.to_array(gamma))
            raised[::2] = numpy_helper.to_array(beta)[::2]
            beta.CopyFrom(numpy_helper.from_array(raised.astype(np.float32), beta.name))
    moments = batchnorm_moments(original)
    model, _, _ = prepare(original, per_channel=True)
    x = np.load(DIGITS / "calib.npz")["input"][:128]
    before = run(model, x)
    absorbing, result = equalize(model, moments)
    assert result.absorbed, "some channel has mean - 4 std > 0"
    for name, shift in result.absorbed.items():
        pair = next(p for p in find_pairs(GraphIndex(absorbing)) if p.first.output[0] == name)
        assert not any(a.name == "pads" and any(a.ints) for a in pair.second.attribute)
        assert np.all(shift >= 0)
    after = run(absorbing, x)
    error = np.sqrt(np.mean((after - before) ** 2)) / np.sqrt(np.mean(before**2))
    assert error < 1e-2  # exact wherever x >= c: all but the tail beyond 4 std


def conv_pair(second_weight: np.ndarray, group: int, extra: list) -> onnx.ModelProto:
    """x[2,3,8,8] -> Conv 3->4 (bias 3-6: a mean well above 0) -> Relu -> Conv `second_weight`
    with bias b2, unpadded, and the nodes `extra` (reading b2 or c1 too)."""
    rng = np.random.default_rng(0)
    skew = 10 ** rng.uniform(-1.5, 1.5, 4)
    inits = [
        numpy_helper.from_array(value.astype(np.float32), name)
        for name, value in [
            ("w1", rng.standard_normal((4, 3, 3, 3)) * skew.reshape(-1, 1, 1, 1)),
            ("b1", rng.uniform(3, 6, 4)),
            ("w2", second_weight),
            ("b2", rng.standard_normal(second_weight.shape[0])),
            ("w3", rng.standard_normal((second_weight.shape[0], 3, 1, 1))),
        ]
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1] * 4),
        helper.make_node("Relu", ["c1"], ["r"], name="relu"),
        helper.make_node("Conv", ["r", "w2", "b2"], ["y"], name="conv2", group=group),
        *extra,
    ]
    outputs = ["y"] + [n.output[0] for n in extra if n.name]  # "other", the If
    graph = helper.make_graph(
        nodes,
        "pair",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 8, 8])],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in outputs],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _branch_reading(tensor: str) -> list[onnx.NodeProto]:
    """An If on a constant-free condition whose branches return `tensor` of the outer graph."""
    cond = helper.make_node("ReduceMax", ["x"], ["peak"], keepdims=0)
    positive = helper.make_node("Cast", ["peak"], ["positive"], to=TensorProto.BOOL)
    branch = {
        name: helper.make_graph(
            [helper.make_node("Identity", [tensor], [f"{name}_out"])],
            name,
            [],
            [helper.make_tensor_value_info(f"{name}_out", TensorProto.FLOAT, None)],
        )
        for name in ("then", "otherwise")
    }
    return [cond, positive, helper.make_node("If", ["positive"], ["z"], name="branch",
                                             then_branch=branch["then"],
                                             else_branch=branch["otherwise"])]  # fmt: skip


@pytest.mark.parametrize(
    ("case", "second", "group", "extra"),
    [
        ("a channel multiplier", (8, 1, 1, 1), 4, []),
        ("a bias another conv reads", (5, 4, 1, 1), 1,
         [helper.make_node("Conv", ["x", "w3", "b2"], ["other"], name="other")]),
        ("conv1's output read inside an If", (5, 4, 1, 1), 1, _branch_reading("c1")),
    ],
)  # fmt: skip
def test_pairs_that_cannot_move_a_scale_are_left_alone(case, second, group, extra):
    """A depthwise conv2 with a channel multiplier reads each channel in several outputs (its
    absorption had crashed), a bias another conv reads would change that conv, and a branch's
    reader would see the rescaled channels: no pair, the function unchanged."""
    model = conv_pair(np.random.default_rng(1).standard_normal(second), group, extra)
    x = np.random.default_rng(2).standard_normal((2, 3, 8, 8)).astype(np.float32)
    session = ort.InferenceSession(model.SerializeToString())
    before = session.run(None, {"x": x})
    moments = {"c1": Moments(np.full(4, 5.0), np.full(4, 0.5))}
    equalized, result = equalize(model, moments)
    assert (result.divided, result.absorbed) == ({}, {}), case
    after = ort.InferenceSession(equalized.SerializeToString()).run(None, {"x": x})
    for want, got in zip(before, after, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
