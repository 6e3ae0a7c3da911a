"""The torch copy where a review found it apart from ONNX Runtime: integer shape arithmetic,
an optional output left out, uneven splits, ops or attributes it cannot follow (refused by
name, never computed otherwise), and a float Conv's per-channel reader written back."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from qdq.config import preset_config
from qdq.errors import ModelError
from qdq.onnx.sessions import open_session
from qdq.pipeline import quantize_model
from qdq.qat.convert import QdqGraph
from qdq.qat.write import write_back

from conftest import DIGITS

CONFIG = preset_config("default")
F = TensorProto.FLOAT


def model_of(nodes: list, inputs: dict, outputs: list[str], constants: dict) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "edges",
        [helper.make_tensor_value_info(n, F, shape) for n, shape in inputs.items()],
        [onnx.ValueInfoProto(name=name) for name in outputs],
        [numpy_helper.from_array(np.asarray(v), k) for k, v in constants.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def torch_and_ort(model: onnx.ModelProto, feeds: dict) -> tuple[list, list]:
    want = open_session(model).run(None, feeds)
    with torch.no_grad():
        graph = QdqGraph(model, CONFIG.weights, CONFIG.activations)
        got = graph({k: torch.from_numpy(v) for k, v in feeds.items()})
    return want, [g.numpy() for g in got]


def test_integer_shape_arithmetic_stays_integer():
    """Div of int64 truncates (a size halved: 5 // 2 = 2, not 2.5), an integer Clip stays
    integer, and a Split of 4 into 3 parts is 2, 2 and 0."""
    nodes = [
        helper.make_node("Shape", ["x"], ["shape"]),
        helper.make_node("Div", ["shape", "two"], ["half"]),
        helper.make_node("Clip", ["half", "low", "high"], ["clipped"]),
        helper.make_node("Cast", ["clipped"], ["y"], to=F),
        helper.make_node("Split", ["x"], ["a", "b", "c"], axis=1, num_outputs=3),
    ]
    constants = {"two": np.array([2], np.int64), "low": np.int64(2), "high": np.int64(3)}
    model = model_of(nodes, {"x": [5, 4]}, ["y", "a", "b", "c"], constants)
    want, got = torch_and_ort(model, {"x": np.ones((5, 4), np.float32)})
    for w, g in zip(want, got, strict=True):
        np.testing.assert_array_equal(g, w)


def test_an_output_left_out_is_no_input_left_out():
    """An LSTM without its Y output wrote "" into the values, which a Clip without its min
    then read as that min."""
    rng = np.random.default_rng(3)
    w, r = rng.normal(size=(1, 4, 2)), rng.normal(size=(1, 4, 1))
    constants = {"W": w.astype(np.float32), "R": r.astype(np.float32), "high": np.float32(10)}
    nodes = [
        helper.make_node("LSTM", ["s", "W", "R"], ["", "yh"], hidden_size=1),
        helper.make_node("Clip", ["x", "", "high"], ["y"]),
    ]
    model = model_of(nodes, {"s": [1, 1, 2], "x": [6]}, ["y", "yh"], constants)
    feeds = {"s": np.array([[[1, -2]]], np.float32), "x": np.linspace(-1, 1, 6, dtype=np.float32)}
    want, got = torch_and_ort(model, feeds)
    for w, g in zip(want, got, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("op", "attrs", "outputs", "words"),
    [
        ("ConvTranspose", {"auto_pad": "SAME_UPPER", "strides": [2, 2]}, 1, "SAME auto_pad"),
        ("AveragePool", {"kernel_shape": [2, 2], "dilations": [2, 2]}, 1, "dilated"),
        ("MaxPool", {"kernel_shape": [2, 2]}, 2, "indices"),
        (
            "AveragePool",
            {"kernel_shape": [2, 2], "strides": [2, 2], "pads": [0, 1, 1, 0], "ceil_mode": 1},
            1,
            "ceil_mode",
        ),
        ("Resize", {"mode": "linear", "antialias": 1}, 1, "antialias"),
    ],
)
def test_what_the_copy_cannot_follow_is_refused_by_name(op, attrs, outputs, words):
    """Each had been computed otherwise than ONNX Runtime computes it, silently."""
    constants = {"w": np.ones((2, 2, 3, 3), np.float32)} if op == "ConvTranspose" else {}
    inputs = ["x", "w"] if op == "ConvTranspose" else ["x"]
    if op == "Resize":
        constants = {"scales": np.array([1, 1, 0.5, 0.5], np.float32)}
        inputs = ["x", "", "scales"]
    names = [f"y{i}" for i in range(outputs)]
    model = model_of([helper.make_node(op, inputs, names, **attrs)], {"x": [1, 2, 6, 6]}, names,
                     constants)  # fmt: skip
    graph = QdqGraph(model, CONFIG.weights, CONFIG.activations)
    with pytest.raises(ModelError, match=words):
        graph({"x": torch.zeros(1, 2, 6, 6)})


def test_a_float_convs_per_channel_reader_is_written_with_its_learned_scale(tmp_path):
    """A Conv kept float between int8 layers reads the codes through a DequantizeLinear of
    its own, the scale repeated per channel: training moved the scale of the QuantizeLinear
    and the file kept the reader's old one, so the float Conv read values off by the ratio."""
    model = onnx.load(DIGITS / "mobilenet.onnx")
    depthwise = tuple(n.name for n in model.graph.node if any(a.name == "group" and a.i > 1
                                                              for a in n.attribute))  # fmt: skip
    config = preset_config("default", prefer="int8", exclude=depthwise)
    quantize_model(DIGITS / "mobilenet.onnx", tmp_path / "q.onnx", DIGITS / "calib.npz", config)
    quantized = onnx.load(tmp_path / "q.onnx")
    graph = QdqGraph(quantized, config.weights, config.activations)
    with torch.no_grad():
        for grid in graph.grids.values():
            for parameter in grid.parameters():
                parameter.mul_(0.9)  # the learned (log) scales moved
    written = {
        t.name: numpy_helper.to_array(t) for t in write_back(quantized, graph).graph.initializer
    }
    readers = [
        n for n in quantized.graph.node if n.name.endswith("_DQ") and "_per_channel_" in n.name
    ]
    assert readers
    for reader in readers:
        q_scale = reader.input[0].removesuffix("_quantized") + "_scale"
        assert np.all(written[reader.input[1]] == written[q_scale]), reader.name
