"""Kernels of the com.microsoft ops ONNX defines on real values (QLinearAdd, QLinearMul, the
average pools, QLinearConcat, QLinearSigmoid, QLinearLeakyRelu): dequantize, compute and
requantize in float64 ("spec"), or ONNX Runtime's float32 arithmetic for them (`mlas.py`).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from qdq.engine.context import Context, Kernel, minus, out_dtype, padded_inputs, zp_or_zero
from qdq.engine.integer import exact_pool_sum
from qdq.engine.mlas import apply_table, lookup_table, requantize_concat
from qdq.engine.mlas import average_pool as mlas_average_pool
from qdq.engine.mlas import global_average_pool as mlas_global_average_pool
from qdq.onnx.conv import ConvGeometry


def elementwise_kernel(op: Callable[[np.ndarray, np.ndarray], np.ndarray], mlas_op) -> Kernel:
    """QLinearAdd / QLinearMul: real values combined, then requantized to C's grid ("spec"), or
    ONNX Runtime's float32 arithmetic for them (`engine/mlas.py`)."""

    def kernel(ctx: Context, inputs: list, attrs: dict) -> list:
        a, a_scale, a_zp, b, b_scale, b_zp, c_scale, c_zp = padded_inputs(inputs, 8)
        if ctx.requant != "spec":
            zero = np.zeros((), a.dtype)
            a_zp, b_zp, c_zp = (zero if z is None else z for z in (a_zp, b_zp, c_zp))
            return [mlas_op(a, a_scale, a_zp, b, b_scale, b_zp, c_scale, c_zp, ctx.compiled)]
        real_a = minus(a, a_zp) * a_scale.astype(np.float64)
        real_b = minus(b, b_zp) * b_scale.astype(np.float64)
        return [_requantize_real(op(real_a, real_b), c_scale, c_zp, a.dtype)]

    return kernel


def _requantize_real(real: np.ndarray, scale: np.ndarray, zp: np.ndarray | None, dtype):
    """Round real results onto an output grid in float64 (the ONNX definition, "spec")."""
    dtype = out_dtype(zp, dtype)
    info = np.iinfo(dtype)
    codes = np.rint(real / scale.astype(np.float64)) + zp_or_zero(zp, dtype).astype(np.float64)
    return np.clip(codes, info.min, info.max).astype(dtype)


def qlinear_global_average_pool(ctx: Context, inputs: list, attrs: dict) -> list:
    x, x_scale, x_zp, y_scale, y_zp = inputs[:5]
    # the spatial axes: between batch and channels when channels are last, after them otherwise
    last = bool(attrs.get("channels_last", 0))
    axes = tuple(range(1, x.ndim - 1)) if last else tuple(range(2, x.ndim))
    if ctx.requant != "spec":
        return [mlas_global_average_pool(x, x_scale, x_zp, y_scale, y_zp, axes)]
    mean = minus(x, x_zp).mean(axis=axes, keepdims=True) * x_scale.astype(np.float64)
    return [_requantize_real(mean, y_scale, y_zp, x.dtype)]


def qlinear_average_pool(ctx: Context, inputs: list, attrs: dict) -> list | None:
    """com.microsoft QLinearAveragePool (NCHW, 2-D): mean of real values per window, padded
    positions counted only with count_include_pad, requantized to the output grid. Other
    forms (channels last, ceil mode, 1-D or 3-D) return None: ONNX Runtime runs them."""
    x, x_scale, x_zp, y_scale, y_zp = padded_inputs(inputs, 5)
    if attrs.get("channels_last", 0) or attrs.get("ceil_mode", 0) or x.ndim != 4:
        return None
    kh, kw = attrs["kernel_shape"]
    geometry = ConvGeometry.from_attributes(attrs | {"group": 1}, x.shape, (1, 1, kh, kw))
    include_pad = bool(attrs.get("count_include_pad", 0))
    if ctx.requant != "spec":
        x_zp, y_zp = (np.zeros((), x.dtype) if z is None else z for z in (x_zp, y_zp))
        return [mlas_average_pool(x, x_scale, x_zp, y_scale, y_zp, geometry, include_pad)]
    real = minus(x, x_zp).astype(np.float64) * x_scale.astype(np.float64)
    ones = np.ones((1, 1, *x.shape[2:]))
    total = exact_pool_sum(real, geometry)
    count = kh * kw if include_pad else exact_pool_sum(ones, geometry)
    return [_requantize_real(total / count, y_scale, y_zp, x.dtype)]


def qlinear_concat(ctx: Context, inputs: list, attrs: dict) -> list:
    y_scale, y_zp, *triples = inputs
    groups = [triples[i : i + 3] for i in range(0, len(triples), 3)]
    if ctx.requant != "spec":
        parts = [requantize_concat(x, s, z, y_scale, y_zp) for x, s, z in groups]
        return [np.concatenate(parts, axis=attrs["axis"])]
    reals = [minus(x, z) * s.astype(np.float64) for x, s, z in groups]
    joined = np.concatenate(reals, axis=attrs["axis"])
    return [_requantize_real(joined, y_scale, y_zp, triples[0].dtype)]


def lookup_kernel(
    function: Callable[[np.ndarray, dict], np.ndarray],
    in_float32: Callable[[np.ndarray, dict], np.ndarray] | None = None,
) -> Kernel:
    """QLinearSigmoid / QLinearLeakyRelu: dequantize, apply, requantize ("spec"), or ONNX
    Runtime's 256-entry table built in float32 (`lookup_table`) with `in_float32`, ONNX
    Runtime's own evaluation of the function, where it has one."""
    table_function = in_float32 or function

    def kernel(ctx: Context, inputs: list, attrs: dict) -> list:
        x, x_scale, x_zp, y_scale, y_zp = padded_inputs(inputs, 5)
        if ctx.requant != "spec":
            x_zp, y_zp = (np.zeros((), x.dtype) if z is None else z for z in (x_zp, y_zp))
            table = lookup_table(
                x_scale, x_zp, y_scale, y_zp, x.dtype, lambda v: table_function(v, attrs)
            )
            return [apply_table(x, table)]
        real = minus(x, x_zp) * x_scale.astype(np.float64)
        return [_requantize_real(function(real, attrs), y_scale, y_zp, x.dtype)]

    return kernel
