"""A session opened from a proto computes what one opened from its bytes does (the same
options), whichever of its weights are handed over in memory rather than serialized."""

import gc

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from qdq.onnx.sessions import HANDED_BYTES, Use, open_session

RNG = np.random.default_rng(0)
WIDTH = 160  # a 160 x 160 float weight: 100 kB, over HANDED_BYTES


def _weight(name: str, dtype: type = np.float32) -> TensorProto:
    values = RNG.normal(size=(WIDTH, WIDTH))
    if dtype is np.int8:
        values = np.clip(values * 40, -127, 127)
    return numpy_helper.from_array(values.astype(dtype), name)


def _branch(name: str, weight: str) -> onnx.GraphProto:
    out = helper.make_tensor_value_info(f"{name}_y", TensorProto.FLOAT, None)
    node = helper.make_node("MatMul", ["h", weight], [f"{name}_y"])
    return helper.make_graph([node], name, [], [out])


def _model() -> onnx.ModelProto:
    """A float MatMul, a QDQ MatMul with int8 weights, a branch that reads a weight only inside
    an If, and a large initializer nothing reads (ONNX Runtime drops it)."""
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"]),
        helper.make_node("QuantizeLinear", ["h", "s", "z"], ["hq"]),
        helper.make_node("DequantizeLinear", ["hq", "s", "z"], ["hd"]),
        helper.make_node("DequantizeLinear", ["wq", "s_w"], ["wd"]),
        helper.make_node("MatMul", ["hd", "wd"], ["q"]),
        helper.make_node("ReduceSum", ["x"], ["total"], keepdims=0),
        helper.make_node("Greater", ["total", "zero"], ["positive"]),
        helper.make_node(
            "If",
            ["positive"],
            ["branched"],
            then_branch=_branch("then", "w_inner"),
            else_branch=_branch("else", "w"),
        ),
    ]
    initializers = [
        _weight("w"),
        _weight("w_inner"),
        _weight("unused"),
        _weight("wq", np.int8),
        numpy_helper.from_array(np.array(0.05, np.float32), "s"),
        numpy_helper.from_array(np.array(0, np.int8), "z"),
        numpy_helper.from_array(np.array(0.02, np.float32), "s_w"),
        numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
    ]
    graph = helper.make_graph(
        nodes,
        "handed",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, WIDTH])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("q", "branched")],
        initializers,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("use", [u for u in Use if u not in (Use.REWRITE, Use.PROFILE)])
def test_a_session_from_a_proto_computes_what_one_from_its_bytes_does(use: Use) -> None:
    model = _model()
    assert max(t.ByteSize() for t in model.graph.initializer) > HANDED_BYTES
    before = model.SerializeToString()
    reference = open_session(before, use)
    session = open_session(model, use)
    assert model.SerializeToString() == before  # the caller's proto is left as it was
    del model
    gc.collect()  # the session keeps what it was handed
    for sign in (1, -1):  # both branches of the If
        x = {"x": sign * np.abs(RNG.normal(size=(2, WIDTH))).astype(np.float32)}
        for got, want in zip(session.run(None, x), reference.run(None, x), strict=True):
            np.testing.assert_array_equal(got, want)
