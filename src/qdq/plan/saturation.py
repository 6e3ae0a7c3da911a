"""Weights that ONNX Runtime's int8 kernels cannot saturate on x86 CPUs without VNNI.

There MLAS multiplies uint8 activations by int8 weights with `vpmaddubsw`, which adds the
products of two neighbouring terms of the sum into a 16-bit lane and clamps it: 255 x 127 +
255 x 127 = 64770 comes out as 32767. ONNX Runtime's docs name the problem and its remedy,
7-bit weights (`reduce_range`), which costs 6 dB of every weight's SQNR. The clamp only bites
where two neighbours of one output channel add past 128 codes of one sign (255 x 128 = 32640
still fits), so `pair_safe` raises each channel's scale just until none does: on
EfficientNet-Lite0 a median of 1.24x, about 2 dB of weight SQNR (docs/ptq.md, "Known limits").

The neighbours are those of ONNX Runtime's reduction order, found by probing its kernels with
one pair of 127s at a time (docs/ptq.md): a convolution sums over (kernel row, kernel column,
input channel) of its group, channels fastest; MatMul and Gemm over K. Depthwise convolutions
(one input and one output channel per group) run another kernel, without the clamp.
"""

from __future__ import annotations

import functools

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

from qdq.config import Placement, QuantConfig, Saturation
from qdq.lowbit import WeightGrid
from qdq.onnx.graph import attributes
from qdq.plan.rules import weight_axis
from qdq.qparams import QParams

PAIR_CODES = 128  # codes of one sign two neighbours may add to: 255 x 128 = 32640 fits int16


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


def pair_safe(qparams: QParams, node: onnx.NodeProto, weight: np.ndarray) -> QParams:
    """`qparams` (signed 8-bit, zero point 0, per channel or per tensor) with each channel's
    scale raised until no two neighbouring terms of its sum add past 128 codes of one sign."""
    scheme = qparams.scheme
    rows = reduction_rows(node, weight)
    if rows is None or scheme.bits != 8 or not scheme.signed or qparams.zero_point.any():
        return qparams
    rows = rows.astype(np.float64)
    if rows.shape[1] % 2:
        rows = np.pad(rows, ((0, 0), (0, 1)))
    pairs = rows.reshape(rows.shape[0], -1, 2)
    widest = np.maximum(
        np.maximum(pairs, 0).sum(axis=2).max(axis=1), np.maximum(-pairs, 0).sum(axis=2).max(axis=1)
    )
    needed = widest / (PAIR_CODES - 1)  # before rounding, which may add 1
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


def pair_clipped(node: onnx.NodeProto, codes: np.ndarray) -> np.ndarray:
    """Signed weight `codes` of `node` with each pair of neighbours that adds past 128 of one
    sign brought back to 128, each giving up half the excess (the least squared error; the
    larger one the rest where the smaller has less than half): for weights learned
    after their scales were made pair-safe (`qdq finetune`), where a few pairs drift past."""
    rows = reduction_rows(node, np.arange(codes.size).reshape(codes.shape))
    return codes if rows is None else clip_pairs(codes, rows)


def clip_pairs(codes: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """`pair_clipped` with the summation order given as `rows`: the flat indices of `codes`
    as (output channels, terms), the `reduction_rows` of `arange(codes.size)`."""
    flat = codes.reshape(-1).astype(np.int64)
    order = np.pad(rows, ((0, 0), (0, rows.shape[1] % 2)), constant_values=-1)
    pairs = order.reshape(-1, 2)
    values = np.where(pairs >= 0, flat[pairs], 0)
    for sign in (1, -1):
        part = np.maximum(sign * values, 0)
        excess = np.maximum(part.sum(axis=1) - PAIR_CODES, 0)
        larger, at = part.argmax(axis=1), np.arange(len(part))
        smaller = np.minimum(excess // 2, part[at, 1 - larger])
        part[at, 1 - larger] -= smaller
        part[at, larger] -= excess - smaller
        values = np.where(sign * values > 0, sign * part, values)
    real = pairs >= 0
    flat[pairs[real]] = values[real]
    return flat.reshape(codes.shape).astype(codes.dtype)
