"""The op families the frontier's candidates keep float, and the graph facts that name them."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from head_models import dfl_head, expected_rows, two_heads
from models import attention_block, constant_q_model, spectrum_model
from qdq.config import QuantConfig
from qdq.onnx.graph import GraphIndex
from qdq.pipeline import prepare, quantize_model
from qdq.plan.decisions import static_decisions
from qdq.plan.families import (
    Families,
    before_expectation,
    before_log,
    first_layers,
    grouped_convs,
    last_layers,
    variants,
)
from qdq.plan.frontier import DECODED

from conftest import DIGITS


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


def test_every_candidate_keeps_the_logits_of_an_expected_box_side_float(tmp_path):
    # YOLOv8's head decodes each box side as the expectation of a Softmax over 16 bins: with
    # those logits int8 the slider captchas' piece edge moved by pixels (docs/unseen.md)
    prepared, _, _ = prepare(dfl_head(), per_channel=True)
    assert before_expectation(prepared) == Families.of(prepared).decoded
    # the expectation, and the logits' layers (the class scores' too: joined before the split)
    assert Families.of(prepared).decoded == {"dfl", "box_conv", "cls_conv"}
    attention, _, _ = prepare(attention_block(), per_channel=True)
    assert before_expectation(attention) == set()  # its Softmax weighs the values, no constant
    source, calibration = tmp_path / "head.onnx", tmp_path / "calib.npy"
    source.write_bytes(dfl_head().SerializeToString())
    np.save(calibration, np.random.default_rng(0).standard_normal((64, 3, 8, 8), np.float32))
    report = quantize_model(source, tmp_path / "q.onnx", calibration)
    decisions = {d.node: d for d in report.decisions}
    assert not decisions["box_conv"].quantized
    assert not decisions["cls_conv"].quantized
    assert not decisions["dfl"].quantized
    assert decisions["box_conv"].reason == DECODED
    assert decisions["body"].quantized


def test_an_expectation_may_weigh_the_probabilities_from_the_left_of_a_matmul():
    assert before_expectation(expected_rows()) == {"logits", "expect"}


def test_an_input_or_output_left_out_links_no_layers():
    """ONNX writes an optional input or output left out as "": a Resize's roi, a Dropout's mask.
    The walks took it for one tensor, so that a layer reaching a Log through a Resize reached
    every layer beside a Dropout too, and a Gemm without its C counted as fed."""
    weights = [
        numpy_helper.from_array(np.ones((2, 2, 1, 1), np.float32), name) for name in ("wa", "wb")
    ]
    scales = numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales")
    flat = numpy_helper.from_array(np.ones((3, 32), np.float32), "wg")
    nodes = [
        helper.make_node("Conv", ["x", "wa"], ["a"], "beside"),
        helper.make_node("Dropout", ["a"], ["kept", ""], "drop"),
        helper.make_node("Conv", ["x", "wb"], ["b"], "logged"),
        helper.make_node("Resize", ["b", "", "scales"], ["up"], "up", mode="nearest"),
        helper.make_node("Abs", ["up"], ["size"], "abs"),
        helper.make_node("Log", ["size"], ["y"], "log"),
        helper.make_node("Flatten", ["x"], ["f"], "flatten"),
        helper.make_node("Gemm", ["f", "wg", ""], ["g"], "gemm", transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "left_out",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 4, 4])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("kept", "y", "g")],
        [*weights, scales, flat],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    assert before_log(model) == {"logged"}
    assert first_layers(model) == last_layers(model) == {"beside", "logged", "gemm"}
