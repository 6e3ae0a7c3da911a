"""Cross-layer equalization and bias absorption (Nagel et al. 2019; docs/quantization.md §15).

For `conv1 -> ReLU -> conv2` (or `conv1 -> conv2`), scaling conv1's output channel i by 1/s_i and
conv2's matching input channel by s_i leaves the network's function unchanged (ReLU commutes with
positive scaling). Choosing `s_i = sqrt(r1_i r2_i) / r2_i`, with r1_i the range of conv1's
channel-i weights and r2_i that of conv2's input-channel-i weights, makes both ranges
`sqrt(r1_i r2_i)`: no channel is left with a handful of levels under one per-tensor scale, the
failure of per-tensor quantization on depthwise networks after BatchNorm folding.

ReLU6 (Clip(0, c)) does not commute with scaling: across it the pair computes `clip(x, 0, c s_i)`.
That equals `clip(x, 0, c)` exactly when channel i never exceeds `c min(1, s_i)`, so each channel
gets a bound from the BatchNorm statistics (x_i <= mean_i + N_SIGMA std_i = m_i): a channel that
may reach the cap keeps s_i = 1, any other needs s_i >= m_i / c. The DFQ paper replaces ReLU6 by
ReLU instead; on EfficientNet-Lite0 that alone drops top-1 agreement with FP32 to 17%.

Bias absorption then moves `c_i = max(0, mean_i - 4 std_i)` out of conv1's bias into conv2's
(`relu(x - c) + c = relu(x)` while x >= c), shrinking the activation range that CLE may have
widened. DFQ takes 3 std; real activations have heavier tails than the Gaussian (on the
depthwise digits model with shifted BatchNorms, tests/test_equalize.py, 3 std changes the
output by 4.0% RMS, 4 std by 0.33%). It is exact only where conv2 has no padding (a padded
border would see -c), so it is done only there, and only across ReLU, whose lower bound moves
with the shift.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from qdq.errors import expect
from qdq.onnx.graph import GraphIndex, attributes, clip_bounds
from qdq.passes.datafree import N_SIGMA, Moments

log = logging.getLogger(__name__)

MAX_ROUNDS = 50
TOLERANCE = 1e-4  # stop when every scale is within 1e-4 of 1
ABSORB_SIGMA = 4.0  # c = max(0, mean - 4 std); DFQ's 3 moves outputs 12x more (module doc)


@dataclass(frozen=True)
class Pair:
    """Two convs joined by at most one activation: Relu, Clip(0, cap), or nothing."""

    first: onnx.NodeProto
    second: onnx.NodeProto
    activation: str | None  # "Relu", "Clip" or None
    cap: float = np.inf


@dataclass(frozen=True)
class Equalized:
    """What equalization did: per conv1 output, the factor its channels were divided by (and
    then how much was subtracted from them by absorption), and the updated statistics."""

    divided: dict[str, np.ndarray]
    absorbed: dict[str, np.ndarray]
    moments: dict[str, Moments]
    capped_pairs: int  # pairs across ReLU6, scaled within the cap's constraint


def equalize(
    model: onnx.ModelProto, moments: dict[str, Moments] | None = None
) -> tuple[onnx.ModelProto, Equalized]:
    """`model`, changed in place, with its conv chains equalized, then biases absorbed where
    exact. `moments` (BatchNorm statistics of conv outputs) bound the scales across ReLU6 and
    size the absorption; without them, ReLU6 pairs and absorption are skipped."""
    expect(model, onnx.ModelProto, "model", "load one with qdq.onnx.model.load_model")
    moments = dict(moments or {})
    index = GraphIndex(model)
    pairs = [p for p in find_pairs(index) if p.activation != "Clip" or p.first.output[0] in moments]
    weights = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in model.graph.initializer}
    bounds = {p.first.output[0]: _bounds(p, moments) for p in pairs}
    divided: dict[str, np.ndarray] = {}
    for _ in range(MAX_ROUNDS):
        largest = 0.0
        for pair in pairs:
            name = pair.first.output[0]
            scale = _equalize_pair(pair, weights, divided.get(name, 1.0), bounds[name])
            divided[name] = divided.get(name, 1.0) * scale
            largest = max(largest, float(np.max(np.abs(np.log(scale)))))
        if largest < TOLERANCE:
            break
    for name, factor in divided.items():
        if name in moments:  # the channel values were divided, and so are their statistics
            m = moments[name]
            moments[name] = Moments(m.mean / factor, m.std / factor, m.low, m.high)
    absorbed = _absorb(pairs, weights, moments)
    _store(model, weights, pairs)
    log.info("equalized %d conv pairs, absorbed biases of %d", len(pairs), len(absorbed))
    capped = sum(p.activation == "Clip" for p in pairs)
    return model, Equalized(divided, absorbed, moments, capped)


def find_pairs(index: GraphIndex) -> list[Pair]:
    """Conv pairs where conv1's output reaches only conv2, through at most one Relu or
    Clip(0, cap), conv2 reads each channel apart from the others or all of them together (not
    a depthwise conv with a channel multiplier), and no weight or bias is shared with another
    layer (absorption adds to conv2's bias)."""
    pairs = []
    for node in index.nodes:
        if not _is_equalizable_conv(node, index):
            continue
        out, activation, cap = node.output[0], None, np.inf
        second = index.sole_consumer(out)
        if second is not None and (bounds := _activation_bounds(second, index)) is not None:
            activation, cap, out = second.op_type, bounds, second.output[0]
            second = index.sole_consumer(out)
        if second is None or not (_is_equalizable_conv(second, index) and second.input[0] == out):
            continue
        group = attributes(second).get("group", 1)
        if group > 1 and index.constant(second.input[1]).shape[0] != group:
            continue  # a channel multiplier: each input read by several outputs
        constants = [*node.input[1:3], *second.input[1:3]]
        if all(len(index.consumers[name]) == 1 for name in constants if name):
            pairs.append(Pair(node, second, activation, cap))
    return pairs


def _activation_bounds(node: onnx.NodeProto, index: GraphIndex) -> float | None:
    """The cap of a Relu (inf) or of a Clip with lower bound 0; None for anything else."""
    if node.op_type == "Relu":
        return np.inf
    if node.op_type != "Clip":
        return None
    low, high = clip_bounds(node, index)
    return high if low == 0 and high is not None else None


def _is_equalizable_conv(node: onnx.NodeProto, index: GraphIndex) -> bool:
    if node.op_type != "Conv" or len(node.input) < 2 or not index.is_constant(node.input[1]):
        return False
    group = attributes(node).get("group", 1)
    channels_in = index.constant(node.input[1]).shape[1]
    return group == 1 or channels_in == 1  # dense or depthwise


def _bounds(pair: Pair, moments: dict[str, Moments]) -> tuple[np.ndarray, np.ndarray] | None:
    """(lowest allowed total scale, channels pinned to 1) across a cap; None: unconstrained."""
    if not np.isfinite(pair.cap):
        return None
    m = moments[pair.first.output[0]]
    peak = m.mean + N_SIGMA * m.std
    return peak / pair.cap, peak >= pair.cap


def _equalize_pair(
    pair: Pair,
    weights: dict,
    total: np.ndarray | float,
    bounds: tuple[np.ndarray, np.ndarray] | None,
) -> np.ndarray:
    """Rescale one pair toward equal per-channel ranges; returns the scales s_i applied.
    `total` is the product of this pair's earlier scales (what `bounds` constrains)."""
    first, second = pair.first, pair.second
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
    if bounds is not None:
        lowest, pinned = bounds
        scale = np.maximum(scale * total, lowest) / total
        scale[pinned] = 1.0 / np.broadcast_to(total, scale.shape)[pinned]
    shape1 = (-1,) + (1,) * (w1.ndim - 1)
    weights[first.input[1]] = w1 / scale.reshape(shape1)
    if len(first.input) > 2 and first.input[2]:
        weights[first.input[2]] = weights[first.input[2]] / scale
    if depthwise:
        weights[second.input[1]] = w2 * scale.reshape(shape1)
    else:
        weights[second.input[1]] = w2 * scale.reshape((1, -1) + (1,) * (w2.ndim - 2))
    return scale


def _absorb(pairs: list[Pair], weights: dict, moments: dict[str, Moments]) -> dict[str, np.ndarray]:
    """Shift `c = max(0, mean - ABSORB_SIGMA std)` out of conv1's channels into conv2's bias,
    across ReLU and into unpadded convs only (where it is exact while x >= c)."""
    absorbed = {}
    for pair in pairs:
        name = pair.first.output[0]
        if pair.activation != "Relu" or name not in moments or _padded(pair.second):
            continue
        if not (len(pair.first.input) > 2 and pair.first.input[2]):
            continue
        m = moments[name]
        shift = np.maximum(0.0, m.mean - ABSORB_SIGMA * m.std)
        if not np.any(shift > 0):
            continue
        w2 = weights[pair.second.input[1]]
        per_output = (
            w2.sum(axis=tuple(range(1, w2.ndim))) * shift
            if w2.shape[1] == 1 and w2.shape[0] == shift.shape[0] and shift.shape[0] > 1
            else w2.sum(axis=tuple(range(2, w2.ndim))) @ shift
        )
        weights[pair.first.input[2]] = weights[pair.first.input[2]] - shift
        bias2 = _bias_name(pair.second, weights, w2.shape[0])
        weights[bias2] = weights[bias2] + per_output
        moments[name] = Moments(m.mean - shift, m.std, m.low, m.high)
        absorbed[name] = shift
    return absorbed


def _padded(node: onnx.NodeProto) -> bool:
    attrs = attributes(node)
    auto_pad = attrs.get("auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    return auto_pad not in ("NOTSET", "VALID") or any(attrs.get("pads", []))


def _bias_name(node: onnx.NodeProto, weights: dict, channels: int) -> str:
    """The conv's bias initializer, created as zeros when it has none."""
    if len(node.input) > 2 and node.input[2]:
        return node.input[2]
    name = f"{node.output[0]}_absorbed_bias"
    weights[name] = np.zeros(channels)
    while len(node.input) < 3:
        node.input.append("")
    node.input[2] = name
    return name


def _store(model: onnx.ModelProto, weights: dict, pairs: list[Pair]) -> None:
    """Write the changed weights and biases back, in their original dtypes."""
    touched = {name for p in pairs for node in (p.first, p.second) for name in node.input[1:3]}
    existing = {t.name for t in model.graph.initializer}
    for tensor in model.graph.initializer:
        if tensor.name in touched:
            original = numpy_helper.to_array(tensor)
            tensor.CopyFrom(numpy_helper.from_array(weights[tensor.name].astype(original.dtype),
                                                    tensor.name))  # fmt: skip
    for name in touched - existing - {""}:
        model.graph.initializer.append(
            numpy_helper.from_array(weights[name].astype(np.float32), name)
        )
