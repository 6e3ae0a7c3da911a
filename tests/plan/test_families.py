"""The op families the frontier's candidates keep float, and the graph facts that name them."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from models import attention_block
from qdq.config import QuantConfig
from qdq.onnx.graph import GraphIndex
from qdq.pipeline import prepare
from qdq.plan.decisions import static_decisions
from qdq.plan.families import (
    Families,
    before_log,
    first_layers,
    grouped_convs,
    last_layers,
    variants,
)

from conftest import DIGITS


def spectrum_model(hidden: bool = True) -> onnx.ModelProto:
    """A waveform x[1, 1, 256] -> two strided convolutions (a spectrum's real and imaginary
    parts, as DNSMOS computes its STFT) -> log power -> two convolutions (one without
    `hidden`): the first two layers both read the input."""
    rng = np.random.default_rng(0)

    def w(name: str, *shape: int) -> onnx.TensorProto:
        return numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)

    node = helper.make_node
    nodes = [
        node("Conv", ["x", "Wre"], ["re"], strides=[16], name="stft_real"),
        node("Conv", ["x", "Wim"], ["im"], strides=[16], name="stft_imag"),
        node("Mul", ["re", "re"], ["re2"], name="square_re"),
        node("Mul", ["im", "im"], ["im2"], name="square_im"),
        node("Add", ["re2", "im2"], ["power"], name="power"),
        node("Add", ["power", "eps"], ["floored"], name="floor"),
        node("Log", ["floored"], ["log"], name="log"),
    ]
    inits = [w("Wre", 8, 1, 32), w("Wim", 8, 1, 32)]
    inits.append(numpy_helper.from_array(np.array(1e-6, np.float32), "eps"))
    if hidden:
        nodes.append(node("Conv", ["log", "W1"], ["h0"], pads=[1, 1], name="conv1"))
        nodes.append(node("Relu", ["h0"], ["h"], name="relu"))
        inits.append(w("W1", 4, 8, 3))
    nodes.append(node("Conv", ["h" if hidden else "log", "W2"], ["y"], name="conv2"))
    inits.append(w("W2", 2, 4 if hidden else 8, 1))
    value = helper.make_tensor_value_info
    graph = helper.make_graph(
        nodes,
        "spectrum",
        [value("x", TensorProto.FLOAT, [1, 1, 256])],
        [value("y", TensorProto.FLOAT, [1, 2, 15])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    return model


def test_variants_keep_one_family_of_ops_float():
    prepared, _, _ = prepare(onnx.load(DIGITS / "cnn.onnx"), per_channel=True)
    decisions = static_decisions(GraphIndex(prepared), QuantConfig())
    ops = {name: d.op_type for name, d in decisions.items()}
    found = variants(decisions, Families.of(prepared))
    assert found["all int8"] == frozenset()
    assert {ops[n] for n in found["Conv only"]} == {"Gemm"}
    assert {ops[n] for n in found["MatMul only"]} == {"Conv"}
    assert {ops[n] for n in found["compute only"]} <= {"Add", "Mul", "GlobalAveragePool"}
    compute = [n for n, d in decisions.items() if d.quantized and d.op_type in ("Conv", "Gemm")]
    assert found["ends float"] == {compute[0], compute[-1]}  # one layer reads the input
    assert "ends and depthwise float" not in found  # no grouped convolution


def test_a_model_with_depthwise_convolutions_gets_them_float_with_its_ends():
    prepared, _, _ = prepare(onnx.load(DIGITS / "mobilenet.onnx"), per_channel=True)
    decisions = static_decisions(GraphIndex(prepared), QuantConfig())
    grouped = grouped_convs(prepared)
    assert len(grouped) == 3  # the digits MobileNet's three depthwise convolutions
    found = variants(decisions, Families(grouped=grouped))
    assert found["ends and depthwise float"] == grouped | found["ends float"]


def test_ends_float_keeps_every_layer_that_reads_the_input_float():
    # With only the first in graph order float, the other kept the waveform on an int8 grid
    # and rounded the spectrum before its Log (DNSMOS: 17.7 against 39.8 dB)
    prepared, _, _ = prepare(spectrum_model(), per_channel=True)
    families = Families.of(prepared)
    assert families.first == {"stft_real", "stft_imag"}
    decisions = static_decisions(GraphIndex(prepared), QuantConfig())
    found = variants(decisions, families)
    assert found["ends float"] == {"stft_real", "stft_imag", "conv2"}  # conv1 stays int8


def test_a_transformers_first_layers_are_its_query_key_and_value():
    prepared, _, _ = prepare(attention_block(), per_channel=True)
    first = first_layers(prepared)
    # the three projections of the LayerNorm's output; q k^T and the rest read them
    assert len(first) == 3
    assert {n.input[0] for n in prepared.graph.node if n.name in first} == {"ln"}


def test_ends_float_leaves_some_layer_int8():
    # two STFT convolutions and the last layer are the whole model: keeping the first in graph
    # order float with the last leaves the other STFT convolution int8, as before
    prepared, _, _ = prepare(spectrum_model(hidden=False), per_channel=True)
    decisions = static_decisions(GraphIndex(prepared), QuantConfig())
    found = variants(decisions, Families.of(prepared))
    assert found["ends float"] == {"stft_real", "conv2"}


def constant_q_model() -> onnx.ModelProto:
    """A waveform x[1, 1, 256] -> a constant-Q transform of two octaves, as basic-pitch
    computes one: the high octave's kernel on the waveform, the low octave's behind a strided
    low-pass convolution -> both octaves' power, concatenated -> Log -> two convolutions."""
    rng = np.random.default_rng(1)

    def w(name: str, *shape: int) -> onnx.TensorProto:
        return numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)

    node = helper.make_node
    nodes = [
        node("Conv", ["x", "Whigh"], ["high"], strides=[32], name="cqt_high"),
        node("Conv", ["x", "Wlp"], ["half"], strides=[2], name="lowpass"),
        node("Conv", ["half", "Wlow"], ["low"], strides=[16], name="cqt_low"),
        node("Concat", ["high", "low"], ["bins"], axis=1, name="octaves"),
        node("Mul", ["bins", "bins"], ["power"], name="power"),
        node("Add", ["power", "eps"], ["floored"], name="floor"),
        node("Log", ["floored"], ["log"], name="log"),
        node("Conv", ["log", "W1"], ["h0"], pads=[1, 1], name="conv1"),
        node("Relu", ["h0"], ["h"], name="relu"),
        node("Conv", ["h", "W2"], ["y"], name="conv2"),
    ]
    inits = [w("Whigh", 4, 1, 32), w("Wlp", 1, 1, 2), w("Wlow", 4, 1, 16)]
    inits += [numpy_helper.from_array(np.array(1e-6, np.float32), "eps")]
    inits += [w("W1", 4, 8, 3), w("W2", 2, 4, 1)]
    value = helper.make_tensor_value_info
    graph = helper.make_graph(
        nodes,
        "constant_q",
        [value("x", TensorProto.FLOAT, [1, 1, 256])],
        [value("y", TensorProto.FLOAT, [1, 2, 8])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    return model


def test_ends_float_keeps_every_layer_a_log_compresses_float():
    # basic-pitch's constant-Q transform: 16 of its 18 kernels are not first layers, and with
    # them int8 its outputs kept 6.5-9.7 dB (19.1-26.1 float: docs/unseen.md)
    prepared, _, _ = prepare(constant_q_model(), per_channel=True)
    families = Families.of(prepared)
    assert before_log(prepared) == families.logged == {"cqt_high", "cqt_low"}  # not lowpass
    assert families.first == {"cqt_high", "lowpass"}
    decisions = static_decisions(GraphIndex(prepared), QuantConfig())
    found = variants(decisions, families)
    assert found["ends float"] == {"cqt_high", "lowpass", "cqt_low", "conv2"}  # conv1 int8
    stft, _, _ = prepare(spectrum_model(), per_channel=True)
    assert before_log(stft) == {"stft_real", "stft_imag"}


def two_heads() -> onnx.ModelProto:
    """x[1, 3, 8, 8] -> two convolutions -> a box head and a score head, each an output, as a
    detector's heads write them."""
    rng = np.random.default_rng(0)

    def w(name: str, *shape: int) -> onnx.TensorProto:
        return numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)

    node = helper.make_node
    nodes = [
        node("Conv", ["x", "W0"], ["a0"], pads=[1, 1, 1, 1], name="body0"),
        node("Relu", ["a0"], ["a"], name="relu0"),
        node("Conv", ["a", "W1"], ["b0"], pads=[1, 1, 1, 1], name="body1"),
        node("Relu", ["b0"], ["b"], name="relu1"),
        node("Conv", ["b", "Wbox"], ["boxes"], name="box_head"),
        node("Conv", ["b", "Wcls"], ["c"], name="score_head"),
        node("Sigmoid", ["c"], ["scores"], name="sigmoid"),
    ]
    inits = [w("W0", 4, 3, 3, 3), w("W1", 4, 4, 3, 3), w("Wbox", 4, 4, 1, 1), w("Wcls", 2, 4, 1, 1)]
    value = helper.make_tensor_value_info
    graph = helper.make_graph(
        nodes,
        "heads",
        [value("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [
            value("boxes", TensorProto.FLOAT, [1, 4, 8, 8]),
            value("scores", TensorProto.FLOAT, [1, 2, 8, 8]),
        ],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    return model


def test_ends_float_keeps_every_head_float():
    # With only the last in graph order float, the other head wrote its output through int8
    # (the layout model's four heads: 0.653 -> 0.675 of FP32's firing scores, three draws)
    prepared, _, _ = prepare(two_heads(), per_channel=True)
    families = Families.of(prepared)
    assert last_layers(prepared) == families.last == {"box_head", "score_head"}
    assert families.first == {"body0"}
    decisions = static_decisions(GraphIndex(prepared), QuantConfig())
    found = variants(decisions, families)
    assert found["ends float"] == {"body0", "box_head", "score_head"}  # body1 stays int8
