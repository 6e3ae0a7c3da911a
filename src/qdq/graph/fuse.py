"""Graph rewrites that ONNX Runtime does not do but that quantized graphs need.

HardSwish written out as `x * clip(x + 3, 0, 6) / 6` (what paddle2onnx and older exporters emit,
and what opsets below 14 must emit) is four float elementwise passes between int8 layers: four
kernel launches and four trips through memory per activation. `x * HardSigmoid(x)` with
alpha 1/6 and beta 1/2 is the same function in two. On the PP-OCR text-direction classifier
(18 such blocks) it is what keeps the INT8 model from beating ONNX Runtime's own (docs/ptq.md).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from qdq.graph.structure import GraphIndex


def fuse_hard_swish(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """`model` with every written-out HardSwish as Mul(x, HardSigmoid(x)); returns the count."""
    index = GraphIndex(model)
    position = {id(node): i for i, node in enumerate(index.nodes)}
    replaced: dict[int, list[onnx.NodeProto]] = {}  # position of a pattern's Add -> new nodes
    dropped: set[int] = set()
    for add in index.nodes:
        match = _match(add, index)
        if match is None:
            continue
        x, nodes, out = match
        hard = helper.make_node(
            "HardSigmoid", [x], [f"{out}_hardsigmoid"], alpha=1 / 6, beta=0.5, name=f"{add.name}_hs"
        )
        mul = helper.make_node("Mul", [x, hard.output[0]], [out], name=add.name)
        replaced[position[id(add)]] = [hard, mul]
        dropped.update(position[id(n)] for n in nodes)
    if not replaced:
        return model, 0
    kept = []
    for i, node in enumerate(index.nodes):
        if i in replaced:
            kept.extend(replaced[i])
        elif i not in dropped:
            kept.append(node)
    del model.graph.node[:]
    model.graph.node.extend(kept)
    return model, len(replaced)


def _match(add: onnx.NodeProto, index: GraphIndex) -> tuple[str, list[onnx.NodeProto], str] | None:
    """(x, the four nodes, the output) where `add` starts x * clip(x + 3, 0, 6) / 6."""
    if add.op_type != "Add" or len(add.input) != 2:
        return None
    x = next((i for i in add.input if not index.is_constant(i)), None)
    three = next((i for i in add.input if index.is_constant(i)), None)
    if x is None or three is None or not _is(index, three, 3.0):
        return None
    clip = _only_user(index, add.output[0])
    if clip is None or clip.op_type != "Clip" or not _clip_is(clip, index, 0.0, 6.0):
        return None
    first = _only_user(index, clip.output[0])
    second = _only_user(index, first.output[0]) if first is not None else None
    if first is None or second is None:
        return None
    # x * clip / 6, or clip / 6 * x (Div by 6 or Mul by 1/6 on either side of the product)
    for times, scale in ((first, second), (second, first)):
        if (
            times.op_type == "Mul"
            and x in times.input
            and _divides_by_six(scale, index)
            and (clip.output[0] in times.input) == (times is first)
        ):
            return x, [add, clip, first, second], second.output[0]
    return None


def _only_user(index: GraphIndex, name: str) -> onnx.NodeProto | None:
    users = index.consumers.get(name, [])
    return users[0] if len(users) == 1 and name not in index.graph_outputs else None


def _is(index: GraphIndex, name: str, value: float) -> bool:
    array = index.constant(name)
    return array.size == 1 and np.isclose(float(array.reshape(())), value, rtol=1e-6)


def _clip_is(node: onnx.NodeProto, index: GraphIndex, low: float, high: float) -> bool:
    bounds = [node.input[i] if len(node.input) > i else "" for i in (1, 2)]
    if bounds[0] and bounds[1]:
        return all(index.is_constant(b) for b in bounds) and (
            _is(index, bounds[0], low) and _is(index, bounds[1], high)
        )
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    return attrs.get("min") == low and attrs.get("max") == high


def _divides_by_six(node: onnx.NodeProto, index: GraphIndex) -> bool:
    constant = next((i for i in node.input if index.is_constant(i)), None)
    if constant is None:
        return False
    return (node.op_type == "Div" and _is(index, constant, 6.0)) or (
        node.op_type == "Mul" and _is(index, constant, 1 / 6)
    )
