"""Cross-layer equalization (Nagel et al. 2019, docs/quantization.md and ../ALGORITHMS.md).

For `conv1 -> ReLU -> conv2` (or `conv1 -> conv2`), scaling conv1's output channel i by 1/s_i and
conv2's matching input channel by s_i leaves the network's function unchanged (ReLU commutes with
positive scaling). Choosing `s_i = sqrt(r1_i r2_i) / r2_i`, with r1_i the range of conv1's
channel-i weights and r2_i that of conv2's input-channel-i weights, makes both ranges
`sqrt(r1_i r2_i)`: no channel is left with a handful of levels under one per-tensor scale, the
failure of per-tensor quantization on depthwise networks after BatchNorm folding.

ReLU6 (Clip 0..6) is not equalized across: its cap would have to move with each channel.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
from onnx import helper, numpy_helper

from qdq.graph.structure import GraphIndex

log = logging.getLogger(__name__)

MAX_ROUNDS = 50
TOLERANCE = 1e-4  # stop when every scale is within 1e-4 of 1


def equalize(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """`model` with its conv chains equalized in place of its weights; returns, per equalized
    conv output, the per-channel factor its values were divided by."""
    index = GraphIndex(model)
    pairs = _pairs(index)
    weights = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in model.graph.initializer}
    divided: dict[str, np.ndarray] = {}
    for _ in range(MAX_ROUNDS):
        largest = 0.0
        for first, second in pairs:
            scale = _equalize_pair(first, second, weights)
            divided[first.output[0]] = divided.get(first.output[0], 1.0) * scale
            largest = max(largest, float(np.max(np.abs(np.log(scale)))))
        if largest < TOLERANCE:
            break
    touched = {name for pair in pairs for node in pair for name in node.input[1:3] if name}
    for tensor in model.graph.initializer:
        if tensor.name in touched:
            original = numpy_helper.to_array(tensor)
            tensor.CopyFrom(numpy_helper.from_array(weights[tensor.name].astype(original.dtype),
                                                    tensor.name))  # fmt: skip
    log.info("equalized %d conv pairs", len(pairs))
    return model, divided


def _pairs(index: GraphIndex) -> list[tuple[onnx.NodeProto, onnx.NodeProto]]:
    """(conv1, conv2) where conv1's output reaches only conv2, through at most one Relu."""
    pairs = []
    for node in index.nodes:
        if not _is_equalizable_conv(node, index):
            continue
        out = node.output[0]
        users = index.consumers.get(out, [])
        if len(users) == 1 and users[0].op_type == "Relu" and out not in index.graph_outputs:
            out = users[0].output[0]
            users = index.consumers.get(out, [])
        if len(users) != 1 or out in index.graph_outputs:
            continue
        second = users[0]
        if not (_is_equalizable_conv(second, index) and second.input[0] == out):
            continue
        constants = [*node.input[1:3], second.input[1]]
        if all(len(index.consumers[name]) == 1 for name in constants if name):
            pairs.append((node, second))  # weights shared with other layers stay untouched
    return pairs


def _is_equalizable_conv(node: onnx.NodeProto, index: GraphIndex) -> bool:
    if node.op_type != "Conv" or len(node.input) < 2 or not index.is_constant(node.input[1]):
        return False
    group = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "group"), 1)
    channels_in = index.constant(node.input[1]).shape[1]
    return group == 1 or channels_in == 1  # dense or depthwise


def _equalize_pair(first: onnx.NodeProto, second: onnx.NodeProto, weights: dict) -> np.ndarray:
    """Rescale one pair toward equal per-channel ranges; returns the scales s_i applied."""
    w1, w2 = weights[first.input[1]], weights[second.input[1]]
    depthwise = w2.shape[1] == 1 and w2.shape[0] == w1.shape[0] and w1.shape[0] > 1
    r1 = np.abs(w1).reshape(w1.shape[0], -1).max(axis=1)
    w2_by_input = w2 if depthwise else np.swapaxes(w2, 0, 1)  # input channel i first
    r2 = np.abs(w2_by_input).reshape(w2_by_input.shape[0], -1).max(axis=1)
    if r2.shape != r1.shape:
        return np.ones_like(r1)
    usable = (r1 > 0) & (r2 > 0)
    scale = np.ones_like(r1)
    scale[usable] = np.sqrt(r1[usable] * r2[usable]) / r2[usable]
    shape1 = (-1,) + (1,) * (w1.ndim - 1)
    weights[first.input[1]] = w1 / scale.reshape(shape1)
    if len(first.input) > 2 and first.input[2]:
        weights[first.input[2]] = weights[first.input[2]] / scale
    if depthwise:
        weights[second.input[1]] = w2 * scale.reshape(shape1)
    else:
        weights[second.input[1]] = w2 * scale.reshape((1, -1) + (1,) * (w2.ndim - 2))
    return scale
