"""A weight that several layers read: rounded once for all of them, stored once in the file."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from qdq.affine import quantize
from qdq.config import QuantConfig
from qdq.onnx.graph import GraphIndex
from qdq.onnx.model import ort_rewrite
from qdq.passes.gptq import HessianSums, _layer_codes, linear_layers, rounded_codes
from qdq.pipeline import quantize_model
from qdq.plan.build import Plan
from qdq.qparams import QParams
from qdq.scheme import INT8_WEIGHTS

CONV = {"pads": [1, 1, 1, 1]}


def _tied(weight: np.ndarray, depth: int) -> onnx.ModelProto:
    """`depth` convolutions in a row, each followed by a Relu, all reading the one `weight`
    (as an unrolled recurrence or a filter bank applied at every scale reads its kernel)."""
    nodes, x = [], "x"
    for i in range(depth):
        nodes += [
            helper.make_node("Conv", [x, "w"], [f"c{i}"], name=f"conv{i}", **CONV),
            helper.make_node("Relu", [f"c{i}"], [f"r{i}"], name=f"relu{i}"),
        ]
        x = f"r{i}"
    channels = weight.shape[0]
    graph = helper.make_graph(
        nodes,
        "tied",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, channels, 12, 12])],
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, None)],
        [numpy_helper.from_array(weight, "w")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _weight(seed: int = 0, channels: int = 6) -> np.ndarray:
    weight = np.random.default_rng(seed).normal(size=(channels, channels, 3, 3))
    return (weight / np.sqrt(channels * 9)).astype(np.float32)


def _output_error(weight: np.ndarray, codes: np.ndarray, scale: np.ndarray, h: np.ndarray) -> float:
    delta = (weight - codes * scale[:, None, None, None]).reshape(len(weight), -1)
    return float(np.einsum("od,de,oe->", delta, h[0], delta))


def test_layers_reading_one_weight_get_one_rounding_of_their_summed_error():
    """GPTQ rounds a shared weight once, on the sum of its readers' H: the summed output error
    of all of them, lower than with either reader's own codes or nearest rounding."""
    weight = _weight()
    model = _tied(weight, 2)
    index = GraphIndex(model)
    layers = linear_layers(index, ["conv0", "conv1"])
    rng = np.random.default_rng(1)
    x = (1 + 0.2 * rng.normal(size=(8, 6, 12, 12))).astype(np.float32)  # correlated terms
    first = ort.InferenceSession(_tied(weight, 1).SerializeToString())
    inner = first.run(None, {"x": x})[0]  # relu0's output, which conv1 reads
    sums = HessianSums(index, layers, limit=len(x))
    for job in sums.jobs({"x": x, "r0": inner}, len(x)):
        job()
    found = sums.found()
    scale = np.abs(weight).reshape(len(weight), -1).max(axis=1) / 127
    qparams = QParams(scale, np.zeros(len(weight), np.int8), INT8_WEIGHTS)
    plan = Plan({}, constants={("conv0", 1): qparams, ("conv1", 1): qparams})
    codes = rounded_codes(index, plan, found, pairs=False, cache={})
    assert set(codes) == {("conv0", 1), ("conv1", 1)}
    np.testing.assert_array_equal(codes["conv0", 1], codes["conv1", 1])
    both = found["conv0"] + found["conv1"]
    np.testing.assert_array_equal(
        codes["conv0", 1], _layer_codes(layers[0], weight, qparams, both, False)
    )
    own = [_layer_codes(layer, weight, qparams, found[layer.name], False) for layer in layers]
    errors = [_output_error(weight, c, scale, both) for c in (codes["conv0", 1], *own)]
    assert errors[0] <= min(errors[1:])
    assert errors[0] < _output_error(weight, quantize(weight, qparams), scale, both)


def test_a_shared_weight_is_stored_once_and_each_layer_still_fuses(tmp_path):
    """Four int8 convolutions of one kernel: the file holds its int8 codes once, each layer
    reads them through its own DequantizeLinear, and ONNX Runtime fuses all four."""
    source, out, calib = tmp_path / "tied.onnx", tmp_path / "tied_int8.onnx", tmp_path / "c.npz"
    onnx.save(_tied(_weight(2), 4), source)
    x = np.random.default_rng(3).uniform(0, 1, (32, 6, 12, 12)).astype(np.float32)
    np.savez(calib, x=x)
    quantize_model(source, out, calib, QuantConfig(prefer="int8"))
    model = onnx.load(out)
    stored = [
        t for t in model.graph.initializer if t.name.startswith("w_") and t.dims == [6, 6, 3, 3]
    ]
    assert [numpy_helper.to_array(t).dtype for t in stored] == [np.int8]
    readers = Counter(i for node in model.graph.node for i in node.input)
    assert readers[stored[0].name] == 4
    fused = Counter(
        node.op_type
        for node in ort_rewrite(model, ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED).graph.node
    )
    assert fused["QLinearConv"] == 4
    want = ort.InferenceSession(str(source)).run(None, {"x": x[:8]})[0]
    got = ort.InferenceSession(str(out)).run(None, {"x": x[:8]})[0]
    assert 10 * np.log10(np.sum(want**2) / np.sum((want - got) ** 2)) > 25
