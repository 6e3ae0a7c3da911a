"""Graph rewrites that ONNX Runtime does not do but that quantized graphs need.

A Conv followed by a constant Mul and/or Add (PP-OCRv4's MobileOne blocks put a learnable
scalar scale and shift after every convolution, which ONNX Runtime's own Conv-Mul/Add fusions
leave alone) is one Conv with scaled weights and bias: folded, the int8 kernel feeds the
activation directly and two float passes go (the recognizer: 56 ops, 12.14 -> 11.71 ms).

A float residual Add before a LayerNormalization becomes a two-input Sum, so that ONNX Runtime
does not fuse the pair into its slow SkipLayerNormalization (see `sum_before_layer_norm`).

HardSwish written out as `x * clip(x + 3, 0, 6) / 6` (what paddle2onnx and older exporters emit,
and what opsets below 14 must emit) is four float elementwise passes between int8 layers: four
kernel launches and four trips through memory per activation. `x * HardSigmoid(x)` with
alpha 1/6 and beta 1/2 is the same function in two. On the PP-OCR text-direction classifier
(18 such blocks) it is what keeps the INT8 model from beating ONNX Runtime's own (docs/ptq.md).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from qdq.onnx.graph import GraphIndex, clip_bounds, drop_unread_initializers


def fuse_hard_swish(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """`model`, changed in place, with every written-out HardSwish as Mul(x, HardSigmoid(x));
    returns the count."""
    index = GraphIndex(model)
    position = {id(node): i for i, node in enumerate(index.nodes)}
    replaced: dict[int, list[onnx.NodeProto]] = {}  # position of a pattern's Add -> new nodes
    dropped: set[int] = set()
    graph = model.graph
    known = {v.name: v for v in (*graph.input, *graph.value_info, *graph.output)}
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
        if x in known:  # the gate's type and shape are x's: the int8 rules read them
            info = graph.value_info.add()
            info.CopyFrom(known[x])
            info.name = hard.output[0]
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


def fold_affine(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """`model`, changed in place, with constant per-channel Mul/Add after a Conv folded into its
    weights and bias; returns how many Mul/Add nodes went."""
    index = GraphIndex(model)
    folded: set[int] = set()
    renamed: dict[str, str] = {}  # Conv output -> the last folded node's output, its new name
    for conv in index.nodes:
        if conv.op_type != "Conv" or not index.is_constant(conv.input[1]):
            continue
        if len(conv.input) > 2 and conv.input[2] and not index.is_constant(conv.input[2]):
            continue
        w = index.constant(conv.input[1]).astype(np.float64)
        bias = index.constant(conv.input[2]).astype(np.float64) if _has_bias(conv) else 0.0
        steps, out = [], conv.output[0]
        while (node := index.sole_consumer(out)) is not None and node.op_type in ("Mul", "Add"):
            value = _channel_constant(node, out, index, w.ndim, w.shape[0])
            if value is None:
                break
            if node.op_type == "Mul":
                w, bias = w * value.reshape((-1,) + (1,) * (w.ndim - 1)), bias * value
            else:
                bias = bias + value
            steps.append(node)
            out = node.output[0]
        if not steps:
            continue
        dtype = index.constant(conv.input[1]).dtype  # a float16 Conv keeps float16 constants
        _set(model, conv, 1, w.astype(dtype))
        _set(model, conv, 2, np.broadcast_to(bias, (w.shape[0],)).astype(dtype))
        folded.update(id(n) for n in steps)
        renamed[conv.output[0]] = out
    if not folded:
        return model, 0
    kept = [n for n in index.nodes if id(n) not in folded]
    for node in kept:
        if node.op_type == "Conv" and node.output[0] in renamed:
            node.output[0] = renamed[node.output[0]]
    del model.graph.node[:]
    model.graph.node.extend(kept)
    drop_unread_initializers(model)
    return model, len(folded)


def sum_before_layer_norm(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """`model`, changed in place, with each float Add of two tensors that feeds only
    LayerNormalizations written as a two-input Sum (the same function); returns the count.

    ONNX Runtime fuses Add + LayerNormalization into SkipLayerNormalization, whose CPU kernel
    (1.32) runs 5-8x slower than the two ops apart (docs/ptq.md). Float residual sums before
    a LayerNorm are what a quantized transformer keeps, so the fusion would eat its gain.
    """
    index = GraphIndex(model)
    count = 0
    for node in index.nodes:
        users = index.consumers.get(node.output[0], [])
        if (
            node.op_type == "Add"
            and node.domain in ("", "ai.onnx")
            and not any(index.is_constant(name) for name in node.input)
            and users
            and all(user.op_type == "LayerNormalization" for user in users)
            and node.output[0] not in index.graph_outputs
        ):
            node.op_type = "Sum"
            count += 1
    return model, count


def _has_bias(node: onnx.NodeProto) -> bool:
    return len(node.input) > 2 and bool(node.input[2])


def _channel_constant(
    node: onnx.NodeProto, data: str, index: GraphIndex, weight_rank: int, channels: int
) -> np.ndarray | None:
    """The Mul/Add's other operand as one value per output channel, if it is a constant that
    broadcasts that way against the (N, C, ...) output (a scalar, or 1 everywhere but C)."""
    other = [name for name in node.input if name != data]
    if len(other) != 1 or not index.is_constant(other[0]):
        return None
    value = index.constant(other[0]).astype(np.float64)
    if value.ndim > weight_rank:
        return None
    shape = (1,) * (weight_rank - value.ndim) + value.shape  # right-aligned, as ONNX broadcasts
    if shape[0] != 1 or shape[1] not in (1, channels) or any(d != 1 for d in shape[2:]):
        return None
    return np.broadcast_to(value.reshape(-1), (channels,)).copy()


def _set(model: onnx.ModelProto, conv: onnx.NodeProto, i: int, value: np.ndarray) -> None:
    """Give `conv` input i a new initializer holding `value` (others may share the old one)."""
    name = f"{conv.name or conv.output[0]}_folded_{i}"
    model.graph.initializer.append(numpy_helper.from_array(value, name))
    while len(conv.input) <= i:
        conv.input.append("")
    conv.input[i] = name


def _match(add: onnx.NodeProto, index: GraphIndex) -> tuple[str, list[onnx.NodeProto], str] | None:
    """(x, the four nodes, the output) where `add` starts x * clip(x + 3, 0, 6) / 6."""
    if add.op_type != "Add" or len(add.input) != 2:
        return None
    x = next((i for i in add.input if not index.is_constant(i)), None)
    three = next((i for i in add.input if index.is_constant(i)), None)
    if x is None or three is None or not _is(index, three, 3.0):
        return None
    clip = index.sole_consumer(add.output[0])
    if clip is None or clip.op_type != "Clip" or not _clip_is(clip, index, 0.0, 6.0):
        return None
    first = index.sole_consumer(clip.output[0])
    second = index.sole_consumer(first.output[0]) if first is not None else None
    if first is None or second is None:
        return None
    # x * clip / 6, or clip / 6 * x (Div by 6 or Mul by 1/6 on either side of the product)
    for times, scale in ((first, second), (second, first)):
        if (
            times.op_type == "Mul"
            and x in times.input
            and _divides_by_six(scale, index)
            and (clip.output[0] in times.input) == (times is first)
            and _keeps_rank(index, x, [three, *scale.input])
        ):
            return x, [add, clip, first, second], second.output[0]
    return None


def _keeps_rank(index: GraphIndex, x: str, names: list[str]) -> bool:
    """Whether none of the constants among `names` has more axes than `x` (of rank 1 where
    unknown): one of shape (1, 1, 1) broadcasts a (2, 5) x to (1, 2, 5), which HardSwish would
    not."""
    rank = len(index.shape.get(x, (None,)))
    return all(len(index.initializers[n].dims) <= rank for n in names if index.is_constant(n))


def _is(index: GraphIndex, name: str, value: float) -> bool:
    array = index.constant(name)
    return array.size == 1 and np.isclose(float(array.reshape(())), value, rtol=1e-6)


def _clip_is(node: onnx.NodeProto, index: GraphIndex, low: float, high: float) -> bool:
    bounds = clip_bounds(node, index)
    return None not in bounds and bool(np.allclose(bounds, (low, high), rtol=1e-6))


def _divides_by_six(node: onnx.NodeProto, index: GraphIndex) -> bool:
    """p / 6 or p * (1/6), never 6 / p."""
    if node.op_type == "Div":
        return index.is_constant(node.input[1]) and _is(index, node.input[1], 6.0)
    constant = next((i for i in node.input if index.is_constant(i)), None)
    return node.op_type == "Mul" and constant is not None and _is(index, constant, 1 / 6)
