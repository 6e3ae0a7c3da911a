"""Each ONNX op `qdq finetune`'s torch copy runs (qdq.qat.ops), one node at a time, against
ONNX Runtime on the same input."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from qdq.config import preset_config
from qdq.onnx.sessions import open_session
from qdq.qat.convert import QdqGraph

CONFIG = preset_config("default")


def _i64(*values: int) -> np.ndarray:
    return np.array(values, np.int64)


def _f32(*values: float) -> np.ndarray:
    return np.array(values, np.float32)


# (op, attributes, constant inputs after x (None: absent), input shape): one node each, run in
# torch by QdqGraph and in ONNX Runtime. Opset 18: axes as inputs, Split's num_outputs.
OP_CASES = [
    ("Resize", {"mode": "nearest"}, [None, np.array([1, 1, 2, 2], np.float32)], (1, 2, 3, 5)),
    ("Resize", {"mode": "linear"}, [None, np.array([1, 1, 2, 2], np.float32)], (1, 2, 3, 5)),
    # nearest by ONNX's coordinates and rounding, linear by the given scale (not the sizes')
    ("Resize", {"mode": "nearest", "nearest_mode": "ceil"}, [None, _f32(1, 1, 2, 2)], (1, 2, 3, 5)),
    ("Resize", {"mode": "nearest"}, [None, None, _i64(1, 2, 2, 3)], (1, 2, 5, 7)),
    (
        "Resize",
        {
            "mode": "nearest",
            "coordinate_transformation_mode": "align_corners",
            "nearest_mode": "round_prefer_ceil",
        },
        [None, _f32(1, 1, 1.5, 1.5)],
        (1, 2, 4, 6),
    ),
    ("Resize", {"mode": "linear"}, [None, _f32(1, 1, 1.5, 0.6)], (1, 2, 4, 6)),
    ("Slice", {}, [_i64(1, 0), _i64(99, -1), _i64(1, 3)], (2, 3, 4, 5)),
    # Swin's shifted windows and torch.flip: backwards, to the front and from a middle index
    ("Slice", {}, [_i64(-1, 3), _i64(-(2**63), 0), _i64(2, 3), _i64(-1, -2)], (2, 3, 4, 5)),
    ("Slice", {}, [_i64(99, -2), _i64(-99, 0), _i64(-1, 1), _i64(-1, -1)], (2, 3, 4, 5)),
    ("Pad", {"mode": "constant"}, [_i64(0, 0, 1, 2, 0, 0, 2, 1), np.float32(0.5)], (1, 2, 3, 4)),
    ("Pad", {"mode": "edge"}, [_i64(0, 0, 1, 2, 0, 0, 2, 1)], (1, 2, 3, 4)),
    ("Pad", {"mode": "wrap"}, [_i64(0, 0, 1, 2, 0, 0, 2, 1)], (1, 2, 3, 4)),
    ("Pad", {"mode": "reflect"}, [_i64(0, 0, 0, 2, 0, 0, 0, 1)], (1, 2, 3, 4)),  # the last axis
    ("ReduceSum", {"noop_with_empty_axes": 1}, [], (2, 3, 4)),
    ("Clip", {}, [], (2, 3)),
    ("Softmax", {"axis": 1}, [], (2, 5, 3)),
    (
        "LayerNormalization",
        {"axis": -1},
        [np.ones(6, np.float32), np.zeros(6, np.float32)],
        (2, 3, 6),
    ),
    ("LayerNormalization", {"axis": -1}, [np.ones((1, 6), np.float32)], (2, 3, 6)),
    ("HardSigmoid", {"alpha": 1 / 6, "beta": 0.5}, [], (2, 7)),
    ("HardSwish", {}, [], (2, 7)),
    ("Transpose", {"perm": [0, 2, 1]}, [], (2, 3, 4)),
    ("Reshape", {}, [_i64(0, -1)], (2, 3, 4)),
    ("Flatten", {"axis": 2}, [], (2, 3, 4, 5)),
    ("ReduceMean", {"keepdims": 1}, [_i64(-1)], (2, 3, 4)),
    ("Pow", {}, [np.float32(2.0)], (2, 3)),
    ("Erf", {}, [], (2, 3)),
    ("Reciprocal", {}, [], (2, 3)),
    ("Expand", {}, [_i64(3, 1, 4)], (2, 1)),  # both ways: (2, 1) and (3, 1, 4) -> (3, 2, 4)
    ("PRelu", {}, [np.array([[[0.1]], [[-0.3]]], np.float32)], (1, 2, 3, 3)),
    ("Range", {}, [np.float32(5.0), np.float32(0.5)], ()),
    ("DepthToSpace", {"blocksize": 2}, [], (1, 8, 2, 3)),
    ("DepthToSpace", {"blocksize": 2, "mode": "CRD"}, [], (1, 8, 2, 3)),
    ("SpaceToDepth", {"blocksize": 2}, [], (1, 2, 4, 6)),
    (
        "LSTM",  # both directions, biases, peepholes: (sequence, batch, features)
        {"hidden_size": 3, "direction": "bidirectional"},
        [
            *np.random.default_rng(1).normal(size=(3, 2, 12, 4)).astype(np.float32)[:1],
            np.random.default_rng(2).normal(size=(2, 12, 3)).astype(np.float32),
            np.random.default_rng(3).normal(size=(2, 24)).astype(np.float32),
            None,
            None,
            None,
            np.random.default_rng(4).normal(size=(2, 9)).astype(np.float32),
        ],
        (5, 2, 4),
    ),
    *(
        (
            "GRU",  # both directions, biases: (sequence, batch, features), PyTorch's form and not
            {"hidden_size": 3, "direction": "bidirectional", "linear_before_reset": after},
            [
                np.random.default_rng(5).normal(size=(2, 9, 4)).astype(np.float32),
                np.random.default_rng(6).normal(size=(2, 9, 3)).astype(np.float32),
                np.random.default_rng(7).normal(size=(2, 18)).astype(np.float32),
            ],
            (5, 2, 4),
        )
        for after in (0, 1)
    ),
    (
        "InstanceNormalization",
        {"epsilon": 1e-3},
        [np.array([0.5, 2.0], np.float32), np.array([0.1, -0.2], np.float32)],
        (2, 2, 3, 4),
    ),
    ("Einsum", {"equation": "bij,jk->bik"}, [np.ones((4, 5), np.float32)], (2, 3, 4)),
    ("Trilu", {"upper": 0}, [np.int64(1)], (2, 4, 5)),
    ("Trilu", {}, [], (4, 5)),
    ("Mod", {"fmod": 1}, [np.float32(0.7)], (2, 3)),  # C's fmod: the sign of the dividend
    ("Gelu", {"approximate": "tanh"}, [], (2, 7)),
    ("ScatterND", {}, [_i64(0, 1, 1, 0).reshape(2, 2), np.ones((2, 4), np.float32)], (2, 3, 4)),
    ("Split", {"axis": 1, "num_outputs": 2}, [], (2, 6)),
    (
        "AveragePool",
        {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]},
        [],
        (1, 2, 7, 7),
    ),
    # uneven pads, not counted (count_include_pad 0): a window's mean over its real cells
    ("AveragePool", {"kernel_shape": [2, 2], "pads": [1, 1, 0, 0]}, [], (1, 2, 5, 5)),
    (
        "AveragePool",
        {"kernel_shape": [2, 2], "strides": [2, 2], "auto_pad": "SAME_UPPER", "ceil_mode": 0},
        [],
        (1, 2, 5, 5),
    ),
    (
        "AveragePool",
        {"kernel_shape": [2, 2], "pads": [0, 0, 1, 1], "count_include_pad": 1},
        [],
        (1, 2, 5, 5),
    ),
    (
        "MaxPool",
        {"kernel_shape": [2, 2], "strides": [2, 2], "pads": [0, 0, 1, 1]},
        [],
        (1, 2, 5, 5),
    ),
    ("GlobalAveragePool", {}, [], (1, 2, 5, 5)),
    ("Gather", {"axis": 1}, [_i64(2, -1)], (2, 4, 3)),
    ("GatherElements", {"axis": 1}, [np.array([[1, -1], [0, 2]], np.int64)], (2, 3)),
    ("Unsqueeze", {}, [_i64(0, -1)], (2, 3)),
    ("Squeeze", {}, [_i64(1)], (2, 1, 3)),
    ("Clip", {}, [np.float32(-0.5), np.float32(0.5)], (2, 3)),
    ("Conv", {"group": 2, "pads": [0, 1, 1, 0]}, [np.ones((4, 1, 2, 2), np.float32)], (1, 2, 5, 5)),
]


@pytest.mark.parametrize(("op", "attrs", "constants", "shape"), OP_CASES)
def test_each_op_runs_as_onnx_runtime_runs_it(
    op: str, attrs: dict, constants: list, shape: tuple[int, ...]
) -> None:
    names = ["x"] + [f"c{i}" if c is not None else "" for i, c in enumerate(constants)]
    inits = [
        onnx.numpy_helper.from_array(np.asarray(c), f"c{i}")
        for i, c in enumerate(constants)
        if c is not None
    ]
    outputs = [f"y{i}" for i in range({"Split": 2, "LSTM": 3, "GRU": 2}.get(op, 1))]
    node = onnx.helper.make_node(op, names, outputs, **attrs)
    x_info = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, shape)
    ys = [onnx.helper.make_tensor_value_info(y, onnx.TensorProto.FLOAT, None) for y in outputs]
    graph = onnx.helper.make_graph([node], op, [x_info], ys, inits)
    opset = 20 if op == "Gelu" else 18  # Gelu is an op from opset 20
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", opset)])
    x = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    want = open_session(model).run(None, {"x": x})
    with torch.no_grad():
        got = QdqGraph(model, CONFIG.weights, CONFIG.activations)({"x": torch.from_numpy(x)})
    for w, g in zip(want, got, strict=True):
        np.testing.assert_allclose(g.numpy(), w, rtol=1e-5, atol=1e-5)


def test_not_runs_as_onnx_runtime_runs_it() -> None:
    """Not reads booleans (an attention mask's padding in all-MiniLM-L6-v2's export)."""
    h = onnx.helper
    nodes = [
        h.make_node("Cast", ["x"], ["b"], to=onnx.TensorProto.BOOL),
        h.make_node("Not", ["b"], ["n"]),
        h.make_node("Cast", ["n"], ["y"], to=onnx.TensorProto.FLOAT),
    ]
    x_info = h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, (2, 3))
    y_info = h.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)
    graph = h.make_graph(nodes, "not", [x_info], [y_info])
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 18)])
    x = np.array([[0, 1, 0], [2, 0, -1]], np.float32)
    want = open_session(model).run(None, {"x": x})[0]
    got = QdqGraph(model, CONFIG.weights, CONFIG.activations)({"x": torch.from_numpy(x)})[0]
    np.testing.assert_array_equal(got.numpy(), want)
