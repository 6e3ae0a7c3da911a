"""Where a grid can start when an elementwise function alone reads the tensor (`plan/floor.py`)."""

from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

import models
from qdq.onnx.graph import GraphIndex
from qdq.plan.floor import flat_floor

SIGMOID = [helper.make_node("Sigmoid", ["x"], ["s"]), helper.make_node("Mul", ["x", "s"], ["y"])]
HARD = [
    helper.make_node("HardSigmoid", ["x"], ["s"], alpha=0.2, beta=0.5),
    helper.make_node("Mul", ["x", "s"], ["y"]),
]


def _index(nodes: list[onnx.NodeProto], constants: dict[str, np.ndarray] | None = None):
    value = helper.make_tensor_value_info
    made = {o for n in nodes for o in n.output}
    read = {i for n in nodes for i in n.input}
    graph = helper.make_graph(
        nodes,
        "floor",
        [value("x", onnx.TensorProto.FLOAT, None)],
        [value(o, onnx.TensorProto.FLOAT, None) for o in sorted(made - read)],
        [numpy_helper.from_array(np.float32(v), k) for k, v in (constants or {}).items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return GraphIndex(model)


def _silu(x: float) -> float:
    return x / (1 + math.exp(-x))


@pytest.mark.parametrize("hi", [1.0, 6.0, 30.0])
def test_silu_is_clamped_where_it_is_half_a_code_from_0_below_its_minimum(hi):
    """Half a code of the grid that starts at the floor, in SiLU's units: times its slope where
    it keeps rising, 1."""
    floor = flat_floor(_index(SIGMOID), "x", -40.0, hi, 255)
    half_code = (hi - floor) / 255 / 2
    assert floor < -1.28
    assert abs(_silu(floor)) <= half_code * 1.001 <= abs(_silu(floor * 0.98))  # 0.8% apart


def test_hard_swish_is_clamped_a_code_under_where_it_becomes_0():
    """Exactly 0 at and below -beta / alpha: the grid's lowest code stays in that flat part, so
    the values clamped there keep their exact output."""
    floor = flat_floor(_index(HARD), "x", -10.0, 6.0, 255)
    code = (6.0 - floor) / 255
    assert -2.5 * 1.008 - code < floor < -2.5 - code  # the grid is 0.8% apart


def test_a_gelu_after_a_per_channel_bias_is_clamped_below_every_channels_dip():
    index = GraphIndex(models.gelu_max_pool())
    bias = numpy_helper.to_array(index.initializers["bias"]).ravel()
    floor = flat_floor(index, "c1", -20.0, 20.0, 255)
    assert floor is not None
    assert floor < -0.7518 - bias.max()  # GELU's minimum, shifted by the largest bias
    gelu = [0.5 * t * (1 + math.tanh(math.sqrt(2 / math.pi) * (t + 0.044715 * t**3)))
            for t in floor + bias]  # fmt: skip
    assert max(abs(g) for g in gelu) <= (20 - floor) / 255 / 2


@pytest.mark.parametrize(
    "nodes",
    [
        [*SIGMOID, helper.make_node("Mul", ["x", "x"], ["z"])],  # x read by another path too
        [helper.make_node("Mul", ["x", "x"], ["y"])],  # monotonic below 0, but never flat
        [helper.make_node("Relu", ["x"], ["y"])],  # absorbed into the producer's range instead
        [helper.make_node("Sigmoid", ["x"], ["y"])],  # flat at the top too: a score's logits
        [helper.make_node("HardSigmoid", ["x"], ["y"])],  # a gate's
        [helper.make_node("Conv", ["x", "w"], ["y"])],  # not elementwise
    ],
    ids=["read-elsewhere", "square", "relu", "sigmoid", "hard-sigmoid", "conv"],
)
def test_no_floor_without_a_flat_elementwise_reader(nodes):
    index = _index(nodes, {"w": np.ones((1, 1, 1, 1))})
    assert flat_floor(index, "x", -20.0, 20.0, 255) is None


def test_no_floor_for_a_grid_that_starts_at_or_above_it():
    assert flat_floor(_index(SIGMOID), "x", -2.0, 6.0, 255) is None  # inside SiLU's dip
    assert flat_floor(_index(SIGMOID), "x", 0.0, 6.0, 255) is None
    assert flat_floor(_index(SIGMOID), "x", -1e-7, 1e-7, 255) is None  # between two samples
