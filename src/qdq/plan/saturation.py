"""Weights that ONNX Runtime's int8 kernels cannot saturate on x86 CPUs without VNNI.

There MLAS multiplies uint8 activations by int8 weights with `vpmaddubsw`, which adds the
products of two neighbouring terms of the sum into a 16-bit lane and clamps it: 255 x 127 +
255 x 127 = 64770 comes out as 32767. ONNX Runtime's docs name the problem and its remedy,
7-bit weights (`reduce_range`), which costs 6 dB of every weight's SQNR. The clamp only bites
where a pair's products of one sign pass int16, so `pair_safe` raises each channel's scale just
until none can, for the largest activation code each term takes in calibration (`peak_codes`;
255 where unknown, when the rule is "no pair past 128 codes of one sign"). Equations and
measurements: docs/quantization.md §20.

The neighbours are those of ONNX Runtime's reduction order, found by probing its kernels with
one pair of 127s at a time: a convolution sums over (kernel row, kernel column, input channel)
of its group, channels fastest; MatMul and Gemm over K. Depthwise convolutions (one input and
one output channel per group) run another kernel, without the clamp.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

from qdq.config import Placement, QuantConfig, Saturation
from qdq.lowbit import WeightGrid
from qdq.onnx.graph import GraphIndex, attributes
from qdq.plan.rules import weight_axis
from qdq.qparams import QParams

PAIR_CODES = 128  # codes of one sign two neighbours may add to: 255 x 128 = 32640 fits int16
INT16_MAX = 32767
# Inputs past every calibration sample's largest: each channel's reach above the zero point is
# doubled (a pair of neighbours that could then clamp is rare; tests/engine's bit-exactness on
# pages and lines beyond 4-8 calibration samples found 1-2 codes of 10^5 clamped without it)
HEADROOM = 2.0


@functools.cache
def kernels_saturate() -> bool:
    """Whether ONNX Runtime's u8s8 kernels on this CPU clamp the 16-bit sum of two products:
    a MatMulInteger of 255 x 127 summed 64 times, run once per process."""
    node = helper.make_node("MatMulInteger", ["a", "b"], ["y"])
    graph = helper.make_graph(
        [node],
        "probe",
        [helper.make_tensor_value_info("a", TensorProto.UINT8, [1, 64])],
        [helper.make_tensor_value_info("y", TensorProto.INT32, [1, 16])],
        [helper.make_tensor("b", TensorProto.INT8, [64, 16], [127] * 64 * 16)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    got = session.run(None, {"a": np.full((1, 64), 255, np.uint8)})[0]
    return bool((got != 255 * 127 * 64).any())


def avoids_saturation(config: QuantConfig) -> bool:
    """Whether `config`'s uniform weights are kept from saturating: auto where this CPU's
    kernels do, and only for ONNX Runtime's placement (TensorRT's kernels do not pair terms)."""
    if config.weight_grid is not WeightGrid.UNIFORM or config.weights.bits < 8:
        return False  # codes within +-63 already: no pair reaches 128
    if config.saturation is Saturation.AUTO:
        return config.placement is Placement.ORT and kernels_saturate()
    return config.saturation is Saturation.AVOID


def reduction_rows(node: onnx.NodeProto, weight: np.ndarray) -> np.ndarray | None:
    """`weight` as (output channels, terms in ONNX Runtime's summation order), or None where
    its kernel does not pair terms (depthwise convolutions, ConvTranspose, other ops)."""
    if node.op_type == "Conv" and weight.ndim >= 3:
        return conv_rows(weight, int(attributes(node).get("group", 1)))
    if node.op_type == "Gemm" and weight.ndim == 2:
        return weight if weight_axis(node, 2) == 0 else weight.T
    if node.op_type == "MatMul" and weight.ndim >= 2:
        return np.moveaxis(weight, -1, 0).reshape(weight.shape[-1], -1)
    return None


def conv_rows(weight: np.ndarray, group: int) -> np.ndarray | None:
    """A convolution's `weight` (out, in per group, kernel...) as its `reduction_rows`: the
    kernel's positions, then the group's input channels fastest; None where it is depthwise."""
    if group > 1 and weight.shape[0] == group and weight.shape[1] == 1:
        return None
    return np.moveaxis(weight, 1, -1).reshape(weight.shape[0], -1)


def summed_inputs(index: GraphIndex, nodes: Iterable[str]) -> list[str]:
    """The activation inputs of `nodes` whose int8 kernels pair terms with a constant weight:
    their largest values (`peak_codes`) say how far each pair may reach."""
    chosen = set(nodes)
    return [
        n.input[0]
        for n in index.nodes
        if n.name in chosen and n.op_type in ("Conv", "Gemm", "MatMul")
        and len(n.input) > 1 and index.is_constant(n.input[1])
    ]  # fmt: skip


def peak_codes(
    node: onnx.NodeProto, weight: np.ndarray, peak: np.ndarray | None, x: QParams | None
) -> np.ndarray | None:
    """The largest uint8 code each term of `weight`'s `reduction_rows` multiplies, from the
    largest calibration sample `peak` of the node's input (one sample's shape) on its grid
    `x`; None (any code up to 255) where that is not known."""
    if peak is None or x is None or x.scheme.signed or x.scale.ndim or peak.ndim == 0:
        return None
    if node.op_type == "Conv":
        group = int(attributes(node).get("group", 1))
        if peak.ndim < 2 or peak.shape[0] != weight.shape[1] * group:
            return None
        channel = peak.reshape(peak.shape[0], -1).max(axis=1).reshape(group, -1)
        of_row = channel[np.arange(weight.shape[0]) * group // weight.shape[0]]
        top = np.tile(of_row, (1, int(np.prod(weight.shape[2:]))))  # positions, channels fastest
    elif node.op_type in ("MatMul", "Gemm") and weight.ndim == 2:
        terms = weight.shape[1 - weight_axis(node, 2)]
        if attributes(node).get("transA", 0) or peak.shape[-1] != terms:
            return None
        top = peak.reshape(-1, terms).max(axis=0)[None, :]
    else:
        return None
    zero = float(x.zero_point)
    above = np.maximum(np.rint(top.astype(np.float64) / float(x.scale)), 0)
    return np.clip(zero + HEADROOM * above, 0, 255)


def pair_safe(
    qparams: QParams, node: onnx.NodeProto, weight: np.ndarray, reach: np.ndarray | None = None
) -> QParams:
    """`qparams` (signed 8-bit, zero point 0, per channel or per tensor) with each channel's
    scale raised until no pair of neighbouring terms of its sum can pass int16: each term's
    weight code times the largest activation code `reach` gives it (`peak_codes`; 255, any
    code, where None), before rounding, which may add half a code to each weight."""
    scheme = qparams.scheme
    rows = reduction_rows(node, weight)
    if rows is None or scheme.bits != 8 or not scheme.signed or qparams.zero_point.any():
        return qparams
    reach = np.broadcast_to(255.0 if reach is None else reach, rows.shape)
    odd = ((0, 0), (0, rows.shape[1] % 2))
    pairs = np.pad(rows.astype(np.float64), odd).reshape(rows.shape[0], -1, 2)
    codes = np.pad(reach, odd).reshape(pairs.shape)
    margin = codes.sum(axis=2) / 2
    up = (np.maximum(pairs, 0) * codes).sum(axis=2) / (INT16_MAX - margin)
    down = (np.maximum(-pairs, 0) * codes).sum(axis=2) / (INT16_MAX + 1 - margin)
    needed = np.maximum(up, down).max(axis=1)
    if qparams.scale.ndim == 0:
        needed = needed.max(initial=0.0)
    if qparams.scale.shape not in ((), needed.shape):
        return qparams  # per channel along another axis than the sum's (not a weight's layout)
    scale = np.maximum(qparams.scale.astype(np.float64), needed)
    if np.array_equal(scale, qparams.scale):
        return qparams
    if scheme.power_of_two_scale:
        scale = 2.0 ** np.ceil(np.log2(scale))
    return QParams(scale, qparams.zero_point, scheme)


def pair_clipped(
    node: onnx.NodeProto, codes: np.ndarray, start: np.ndarray | None = None
) -> np.ndarray:
    """Signed weight `codes` of `node` with each pair of neighbours that adds more codes of one
    sign than 128, or than the pair held in `start` if more (PTQ's codes, made safe for the
    activations calibration saw), brought back to that, each code giving up half the excess
    (the least squared error; the larger one the rest where the smaller has less than half):
    for weights trained after their scales were made pair-safe (`qdq finetune`)."""
    rows = reduction_rows(node, np.arange(codes.size).reshape(codes.shape))
    if rows is None:
        return codes
    limits = None if start is None else _pair_parts(start.reshape(-1), rows).sum(axis=2)
    return clip_pairs(codes, rows, limits)


def clip_pairs(codes: np.ndarray, rows: np.ndarray, limits: np.ndarray | None = None) -> np.ndarray:
    """`pair_clipped` with the summation order given as `rows`, the flat indices of `codes` as
    (output channels, terms) (the `reduction_rows` of `arange(codes.size)`), and each pair's
    own limits (pairs, 2: positive, negative codes) raised to 128 where lower."""
    flat, order = codes.reshape(-1).astype(np.int64), _pair_order(rows)
    values = np.where(order >= 0, flat[order], 0)
    limit = (
        np.full((len(order), 2), PAIR_CODES) if limits is None else np.maximum(limits, PAIR_CODES)
    )
    for side, sign in enumerate((1, -1)):
        part = np.maximum(sign * values, 0)
        excess = np.maximum(part.sum(axis=1) - limit[:, side], 0)
        larger, at = part.argmax(axis=1), np.arange(len(part))
        smaller = np.minimum(excess // 2, part[at, 1 - larger])
        part[at, 1 - larger] -= smaller
        part[at, larger] -= excess - smaller
        values = np.where(sign * values > 0, sign * part, values)
    real = order >= 0
    flat[order[real]] = values[real]
    return flat.reshape(codes.shape).astype(codes.dtype)


def _pair_parts(flat: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """(pairs, 2 sides, 2 terms): each pair's positive codes, then its negative ones' sizes."""
    order = _pair_order(rows)
    values = np.where(order >= 0, flat.astype(np.int64)[order], 0)
    return np.stack([np.maximum(values, 0), np.maximum(-values, 0)], axis=1)


def _pair_order(rows: np.ndarray) -> np.ndarray:
    """(pairs, 2): the flat indices of each pair of neighbours in `rows`, -1 past an odd end."""
    return np.pad(rows, ((0, 0), (0, rows.shape[1] % 2)), constant_values=-1).reshape(-1, 2)
