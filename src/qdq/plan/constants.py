"""The integer grids of a plan's constant inputs: weights per channel (uniform, or the low-bit
grids of `qdq.lowbit`, whose codes the plan carries), int32 biases that fit their codes, and
embedding tables in 8 bits."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np
import onnx

from qdq.affine import fake_quantize
from qdq.config import QuantConfig
from qdq.lowbit import WeightGrid, grid_codes
from qdq.metrics import sqnr_db
from qdq.onnx.graph import GraphIndex
from qdq.plan.rules import Kind, rule_inputs, rules_for, weight_axis
from qdq.plan.saturation import avoids_saturation, pair_safe, peak_codes
from qdq.qparams import QParams, Range, choose_qparams
from qdq.scheme import QScheme

if TYPE_CHECKING:
    from qdq.plan.decisions import Decision

Key = tuple[str, int]  # (node name, input index)

# An embedding table goes 8-bit only if one grid keeps its median row this clean.
# all-MiniLM-L6-v2: word embeddings 30.2 dB, token types 33.2, positions 20.3 (a few large
# values); measured in docs/ptq.md.
TABLE_MIN_SQNR_DB = 25.0
BIAS_CODE_LIMIT = 2**30  # int32 bias codes, with room for bias correction and the accumulator


def plan_constants(
    index: GraphIndex,
    decisions: Mapping[str, Decision],
    activations: Mapping[str, QParams],
    config: QuantConfig,
    per_channel: bool,
    peaks: Mapping[str, np.ndarray] | None = None,
) -> tuple[dict[Key, QParams], dict[Key, np.ndarray], dict[Key, np.ndarray]]:
    """The qparams of the int8 kernels' constant inputs (weights per channel, other constants
    per tensor), the scales s_x * s_w of their int32 biases, and the weights' codes on a
    low-bit grid (none on the uniform one: nearest rounding gives those). Where int8 kernels
    would saturate, weights are pair-safe for the largest input `peaks` calibration saw (for
    any input where it has none)."""
    constants: dict[Key, QParams] = {}
    biases: dict[Key, np.ndarray] = {}
    codes: dict[Key, np.ndarray] = {}
    rules = rules_for(config)
    pairs = avoids_saturation(config)
    for node in index.nodes:
        if not decisions[node.name].quantized:
            continue
        rule = rules[node.op_type]
        if rule.kind not in (Kind.COMPUTE, Kind.INPUTS):  # a constant operand: float
            continue
        weight = rule.weight
        if node.op_type == "MatMul" and index.is_constant(node.input[1]):
            weight = 1
        indices = rule_inputs(node, rule)
        if weight is not None and weight not in indices:
            indices.append(weight)
        for i in indices:
            name = node.input[i]
            if not index.is_constant(name):
                continue
            values = index.constant(name)
            if i == weight:
                axis = weight_axis(node, values.ndim) if per_channel and values.ndim > 1 else None
                if config.weight_grid is WeightGrid.UNIFORM:
                    constants[node.name, i] = weight_qparams(values, axis, config)
                    if pairs:
                        x = activations.get(node.input[0])
                        reach = peak_codes(node, values, (peaks or {}).get(node.input[0]), x)
                        safe = pair_safe(constants[node.name, i], node, values, reach)
                        constants[node.name, i] = safe
                else:
                    codes[node.name, i], constants[node.name, i] = _on_grid(values, axis, config)
            else:
                rng = Range(values.min(), values.max())
                constants[node.name, i] = choose_qparams(rng, config.activations)
        if weight is not None and rule.bias is not None and len(node.input) > rule.bias:
            bias = node.input[rule.bias]
            row = index.constant(bias).reshape(-1) if bias and index.is_constant(bias) else None
            if row is not None and index.constant(bias).shape in ((row.size,), (1, row.size)):
                x_scale = activations[node.input[0]].scale.astype(np.float64)
                fitted = _fit_bias(row, x_scale, constants[node.name, weight])
                constants[node.name, weight] = fitted
                biases[node.name, rule.bias] = (x_scale * fitted.scale).astype(np.float32)
        # MatMul + Add becomes a Gemm in ONNX Runtime only for a MatMul (a Gemm has its bias)
        matmul = rule.kind is Kind.COMPUTE and node.op_type == "MatMul" and weight == 1
        if matmul and node.output[0] not in activations:
            biases.update(_bias_add(index, node, activations, constants))
    return constants, biases, codes


def _bias_add(
    index: GraphIndex,
    node: onnx.NodeProto,
    activations: Mapping[str, QParams],
    constants: dict[Key, QParams],
) -> dict[Key, np.ndarray]:
    """The int32 bias scale of the constant Add after an int8 MatMul whose output stays float.

    With fixed shapes ONNX Runtime fuses MatMul + Add into Gemm (with Reshapes) before its QDQ
    fusions, and a Gemm reading a float bias and writing a float output stays a float Gemm
    behind DequantizeLinears: all-MiniLM-L6-v2 exported with batch 1 kept 18 of its 36 linear
    layers so (the attention output projections and both FFN layers). With the bias behind a
    DequantizeLinear of int32 codes at s_x * s_w, as a Gemm's own bias, it becomes QGemm."""
    add = index.sole_consumer(node.output[0])
    if add is None or add.op_type != "Add":
        return {}
    i = 1 if add.input[0] == node.output[0] else 0
    bias, columns = add.input[i], index.constant(node.input[1]).shape[-1]
    if not index.is_constant(bias) or index.constant(bias).shape != (columns,):
        return {}
    x_scale = activations[node.input[0]].scale.astype(np.float64)
    fitted = _fit_bias(index.constant(bias), x_scale, constants[node.name, 1])
    constants[node.name, 1] = fitted
    return {(add.name, i): (x_scale * fitted.scale).astype(np.float32)}


def _fit_bias(bias: np.ndarray, x_scale: np.ndarray, weights: QParams) -> QParams:
    """Weight qparams whose scales are raised where the bias would not fit its int32 codes.

    A dead channel (all-zero weights, as EfficientNet-Lite0's stem has) gets the smallest scale,
    so `bias / (s_x s_w)` overflows int32: ONNX Runtime's int8 kernel then outputs garbage for
    that channel. Its weights are all zero, so any scale quantizes them exactly."""
    needed = np.abs(bias.astype(np.float64)) / (x_scale * BIAS_CODE_LIMIT)
    if weights.scale.ndim == 0:
        needed = needed.max(initial=0.0)
    scale = np.maximum(weights.scale.astype(np.float64), needed)
    if np.array_equal(scale, weights.scale):
        return weights
    if weights.scheme.power_of_two_scale:
        scale = 2.0 ** np.ceil(np.log2(scale))
    return QParams(scale, weights.zero_point, weights.scheme)


def weight_qparams(values: np.ndarray, axis: int | None, config: QuantConfig) -> QParams:
    """The weight grid of `values`: one scale per slice along `axis`, or one for all (None)."""
    scheme = config.weight_scheme(axis)
    if axis is None:
        return choose_qparams(Range(values.min(), values.max()), scheme)
    axes = tuple(d for d in range(values.ndim) if d != axis)
    return choose_qparams(Range(values.min(axis=axes), values.max(axis=axes)), scheme)


def _on_grid(
    values: np.ndarray, axis: int | None, config: QuantConfig
) -> tuple[np.ndarray, QParams]:
    """Codes and qparams (zero point 0) of a weight on the config's low-bit grid (§16-§18).
    A bias too large for a channel's int32 codes raises its scale (`_fit_bias`) and these
    codes stay: exact for a dead channel on the ternary and power-of-two grids (codes all 0),
    not on the binary one (codes +-1)."""
    scheme = config.weight_scheme(axis)
    codes, scale = grid_codes(values, config.weight_grid, scheme)
    return codes, QParams(scale, np.zeros(scale.shape, np.int64), scheme)


def table_qparams(table: np.ndarray, axis: int, grid: QScheme) -> tuple[QParams, float]:
    """The grid of an embedding table that a Gather reads along `axis`, and the SQNR (dB) it
    keeps in the median slice. The activations' grid (uint8 on x86), not the weights': ONNX
    Runtime turns int8 Q/DQ pairs between float ops into uint8 ones, and then the table's DQ
    and the rows' Q no longer match, so it would dequantize the whole table on every run."""
    qparams = choose_qparams(Range(table.min(), table.max()), grid)
    return qparams, _row_sqnr(table, qparams, axis)


def _row_sqnr(table: np.ndarray, qparams: QParams, axis: int) -> float:
    """SQNR in dB of the median slice that a Gather along `axis` picks: a few large entries
    (which carry most of the table's power) must not hide that every other row loses."""
    rows = np.moveaxis(table, axis, 0).reshape(table.shape[axis], -1).astype(np.float64)
    error = fake_quantize(rows, qparams) - rows
    power, noise = np.mean(rows**2, axis=1), np.mean(error**2, axis=1)
    return float(np.median(sqnr_db(power, noise)))
