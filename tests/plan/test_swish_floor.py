"""Which tensors only a swish reads, and where their grids can start (`plan/flow.py`)."""

from __future__ import annotations

import math

import onnx
from onnx import helper

from qdq.onnx.graph import GraphIndex
from qdq.plan.flow import swish_floor, swish_inputs


def _graph(nodes: list[onnx.NodeProto]) -> GraphIndex:
    value = helper.make_tensor_value_info
    graph = helper.make_graph(
        nodes,
        "swish",
        [value("x", onnx.TensorProto.FLOAT, [1, 4])],
        [value(n.output[0], onnx.TensorProto.FLOAT, None) for n in nodes if n.op_type == "Mul"],
    )
    return GraphIndex(helper.make_model(graph))


def test_swishes_are_found_and_other_readers_rule_them_out():
    silu = [helper.make_node("Sigmoid", ["x"], ["s"]), helper.make_node("Mul", ["s", "x"], ["y"])]
    hard = [
        helper.make_node("HardSigmoid", ["x"], ["s"], alpha=1 / 6),
        helper.make_node("Mul", ["x", "s"], ["y"]),
    ]
    assert [g.op_type for g in swish_inputs(_graph(silu))["x"]] == ["Sigmoid"]
    assert [g.op_type for g in swish_inputs(_graph(hard))["x"]] == ["HardSigmoid"]
    square = [helper.make_node("Sigmoid", ["x"], ["s"]), helper.make_node("Mul", ["x", "x"], ["y"])]
    gate_read_elsewhere = [*silu, helper.make_node("Mul", ["s", "s"], ["z"])]
    x_read_elsewhere = [*silu, helper.make_node("Mul", ["x", "x"], ["z"])]
    for nodes in (square, gate_read_elsewhere, x_read_elsewhere):
        assert swish_inputs(_graph(nodes)) == {}


def test_floors_sit_where_the_swish_is_zero_or_half_a_code_from_it():
    hard = [helper.make_node("HardSigmoid", ["x"], ["s"], alpha=1 / 6, beta=0.5)]
    assert math.isclose(swish_floor(hard, 6.0, 255), -3 - 9 / 255, rel_tol=1e-6)
    sigmoid = [helper.make_node("Sigmoid", ["x"], ["s"])]
    for hi in (1.0, 6.0, 30.0):
        floor = swish_floor(sigmoid, hi, 255)
        half_code = (hi - floor) / 255 / 2
        assert math.isclose(abs(floor / (1 + math.exp(-floor))), half_code, rel_tol=1e-6)
        assert floor < -1.28  # below SiLU's minimum, where it tends to 0
    mixed = [*hard, *sigmoid]
    assert swish_floor(mixed, 6.0, 255) is None
