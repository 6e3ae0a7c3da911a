"""One kernel per integer op, named after the op, with the spec's input names.

Each takes the run's `Context`, the node's inputs (None for an absent optional input) and its
attributes, and returns the outputs. `KERNELS` maps (domain, op type) to the kernel.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from qdq.engine.integer import (
    Accumulator,
    exact_conv,
    exact_matmul,
    exact_pool_sum,
    requantize_output,
)
from qdq.engine.quantize_ops import dequantize_linear, dynamic_quantize_linear, quantize_linear
from qdq.errors import ModelError
from qdq.fixedpoint import quantize_multiplier
from qdq.onnx.conv import ConvGeometry

MS = "com.microsoft"
# How a 32-bit accumulator becomes the output code: the fixed-point multiplier M0 * 2^-n
# (gemmlowp/TFLite) or the float scale (ONNX Runtime), docs/engine.md.
Requant = Literal["fixed", "float"]


@dataclass
class Context:
    """Settings of one run and what it observed per node."""

    requant: Requant = "fixed"
    accumulator_bits: int = 32
    accumulators: dict[str, Accumulator] = field(default_factory=dict)
    multipliers: dict[bytes, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    node: str = ""

    def requantize(
        self, acc: np.ndarray, multiplier: np.ndarray, zero_point: np.ndarray, dtype: np.dtype
    ) -> np.ndarray:
        """Output codes from the accumulator; in fixed mode `(m0, shift)` is computed once per
        distinct multiplier and kept (the engine passes the same dict to every run)."""
        fixed = None
        if self.requant == "fixed":
            real = np.asarray(multiplier, dtype=np.float64)
            key = real.tobytes() + str(real.shape).encode()
            if key not in self.multipliers:
                self.multipliers[key] = quantize_multiplier(real)
            fixed = self.multipliers[key]
        return requantize_output(acc, multiplier, zero_point, dtype, self.requant, fixed)

    def accumulate(self, acc: np.ndarray) -> np.ndarray:
        """The node's int accumulator through the simulated hardware accumulator."""
        meter = self.accumulators.setdefault(self.node, Accumulator(self.accumulator_bits))
        return meter.clamp(acc)


Kernel = Callable[[Context, list, dict], list]


def _padded(inputs: list, count: int) -> list:
    """The node's inputs with absent optional ones as None, `count` in all."""
    return [*inputs, *[None] * count][:count]


def _minus(codes: np.ndarray, zero_point: np.ndarray | None, axis: int | None = None) -> np.ndarray:
    """Codes with their zero point removed, as int64 (per-axis zero points on `axis`)."""
    values = codes.astype(np.int64)
    if zero_point is None:
        return values
    zp = zero_point.astype(np.int64)
    if zp.ndim == 1 and zp.size > 1 and axis is not None:
        shape = [1] * values.ndim
        shape[axis] = zp.size
        zp = zp.reshape(shape)
    return values - zp


def _out_dtype(zero_point: np.ndarray | None, fallback: np.dtype) -> np.dtype:
    return zero_point.dtype if zero_point is not None else fallback


def _zp(zero_point: np.ndarray | None, dtype: np.dtype) -> np.ndarray:
    return zero_point if zero_point is not None else np.zeros((), dtype)


def quantize_linear_kernel(ctx: Context, inputs: list, attrs: dict) -> list:
    x, scale, zero_point = _padded(inputs, 3)
    keys = ("axis", "block_size", "saturate", "output_dtype")
    return [quantize_linear(x, scale, zero_point, **{k: attrs[k] for k in keys if k in attrs})]


def dequantize_linear_kernel(ctx: Context, inputs: list, attrs: dict) -> list:
    x, scale, zero_point = _padded(inputs, 3)
    keys = ("axis", "block_size", "output_dtype")
    return [dequantize_linear(x, scale, zero_point, **{k: attrs[k] for k in keys if k in attrs})]


def dynamic_quantize_linear_kernel(ctx: Context, inputs: list, attrs: dict) -> list:
    return list(dynamic_quantize_linear(inputs[0]))


def conv_integer(ctx: Context, inputs: list, attrs: dict) -> list:
    x, w, x_zero_point, w_zero_point = _padded(inputs, 4)
    geometry = ConvGeometry.from_attributes(attrs, x.shape, w.shape)
    acc = exact_conv(_minus(x, x_zero_point), _minus(w, w_zero_point, axis=0), geometry)
    return [ctx.accumulate(acc).astype(np.int32)]


def _product(
    ctx: Context,
    a: np.ndarray,
    a_zero_point: np.ndarray | None,
    b: np.ndarray,
    b_zero_point: np.ndarray | None,
) -> np.ndarray:
    """The accumulated integer product of two code tensors less their zero points (a's per
    row, b's per column)."""
    return ctx.accumulate(
        exact_matmul(
            _minus(a, a_zero_point, axis=a.ndim - 2), _minus(b, b_zero_point, axis=b.ndim - 1)
        )
    )


def matmul_integer(ctx: Context, inputs: list, attrs: dict) -> list:
    a, b, a_zero_point, b_zero_point = _padded(inputs, 4)
    return [_product(ctx, a, a_zero_point, b, b_zero_point).astype(np.int32)]


def qlinear_conv(ctx: Context, inputs: list, attrs: dict) -> list:
    x, x_scale, x_zp, w, w_scale, w_zp, y_scale, y_zp, bias = _padded(inputs, 9)
    geometry = ConvGeometry.from_attributes(attrs, x.shape, w.shape)
    acc = exact_conv(_minus(x, x_zp), _minus(w, w_zp, axis=0), geometry)
    if bias is not None:
        acc = acc + bias.astype(np.int64).reshape(1, -1, 1, 1)
    acc = ctx.accumulate(acc)
    multiplier = x_scale * w_scale / y_scale  # in the scales' own precision, as ONNX computes
    if np.size(multiplier) > 1:
        multiplier = multiplier.reshape(1, -1, 1, 1)
    dtype = _out_dtype(y_zp, x.dtype)
    return [ctx.requantize(acc, multiplier, _zp(y_zp, dtype), dtype)]


def qlinear_matmul(ctx: Context, inputs: list, attrs: dict) -> list:
    a, a_scale, a_zp, b, b_scale, b_zp, y_scale, y_zp = inputs[:8]
    acc = _product(ctx, a, a_zp, b, b_zp)
    multiplier = a_scale * b_scale / y_scale
    dtype = _out_dtype(y_zp, a.dtype)
    return [ctx.requantize(acc, multiplier, _zp(y_zp, dtype), dtype)]


def matmul_integer_to_float(ctx: Context, inputs: list, attrs: dict) -> list:
    """com.microsoft MatMulIntegerToFloat: the int32 product of the codes, scaled to float (a
    MatMul whose output nothing reads as int8), plus an optional float bias."""
    a, b, a_scale, b_scale, a_zp, b_zp, bias = _padded(inputs, 7)
    out = _product(ctx, a, a_zp, b, b_zp).astype(np.float64) * (a_scale * b_scale).astype(
        np.float64
    )
    if bias is not None:
        out = out + bias
    return [out.astype(np.float32)]


def qgemm(ctx: Context, inputs: list, attrs: dict) -> list:
    """com.microsoft QGemm: alpha * A' B' + C with int32 C; quantized output when y_scale given."""
    a, a_scale, a_zp, b, b_scale, b_zp, c, y_scale, y_zp = _padded(inputs, 9)
    a_values = _minus(a, a_zp)
    b_values = _minus(b, b_zp, axis=0 if attrs.get("transB", 0) else 1)
    if attrs.get("transA", 0):
        a_values = a_values.T
    if attrs.get("transB", 0):
        b_values = b_values.T
    acc = exact_matmul(a_values, b_values)
    if c is not None:
        acc = acc + c.astype(np.int64)
    acc = ctx.accumulate(acc)
    scale = np.float32(attrs.get("alpha", 1.0)) * a_scale * b_scale
    if y_scale is None:
        return [(acc.astype(np.float64) * scale).astype(np.float32)]
    dtype = _out_dtype(y_zp, a.dtype)
    return [ctx.requantize(acc, scale / y_scale, _zp(y_zp, dtype), dtype)]


def _elementwise(op: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> Kernel:
    """QLinearAdd / QLinearMul: real values combined, then requantized to C's grid."""

    def kernel(ctx: Context, inputs: list, attrs: dict) -> list:
        a, a_scale, a_zp, b, b_scale, b_zp, c_scale, c_zp = _padded(inputs, 8)
        real_a = _minus(a, a_zp) * a_scale.astype(np.float64)
        real_b = _minus(b, b_zp) * b_scale.astype(np.float64)
        return [_requantize_real(op(real_a, real_b), c_scale, c_zp, a.dtype)]

    return kernel


def _requantize_real(real: np.ndarray, scale: np.ndarray, zp: np.ndarray | None, dtype):
    """Round real results onto an output grid (the float requantization these ops define)."""
    dtype = _out_dtype(zp, dtype)
    info = np.iinfo(dtype)
    codes = np.rint(real / scale.astype(np.float64)) + _zp(zp, dtype).astype(np.float64)
    return np.clip(codes, info.min, info.max).astype(dtype)


def qlinear_global_average_pool(ctx: Context, inputs: list, attrs: dict) -> list:
    x, x_scale, x_zp, y_scale, y_zp = inputs[:5]
    axes = (1, 2) if attrs.get("channels_last", 0) else tuple(range(2, x.ndim))
    mean = _minus(x, x_zp).mean(axis=axes, keepdims=True) * x_scale.astype(np.float64)
    return [_requantize_real(mean, y_scale, y_zp, x.dtype)]


def qlinear_average_pool(ctx: Context, inputs: list, attrs: dict) -> list:
    """com.microsoft QLinearAveragePool (NCHW, 2-D): mean of real values per window, padded
    positions counted only with count_include_pad, requantized to the output grid."""
    x, x_scale, x_zp, y_scale, y_zp = _padded(inputs, 5)
    if attrs.get("channels_last", 0) or attrs.get("ceil_mode", 0) or x.ndim != 4:
        raise ModelError(
            "QLinearAveragePool with channels_last, ceil_mode or a non-2-D input has no "
            "integer kernel; run the model with --engine ort"
        )
    kh, kw = attrs["kernel_shape"]
    geometry = ConvGeometry.from_attributes(attrs | {"group": 1}, x.shape, (1, 1, kh, kw))
    real = _minus(x, x_zp).astype(np.float64) * x_scale.astype(np.float64)
    ones = np.ones((1, 1, *x.shape[2:]))
    total = exact_pool_sum(real, geometry)
    count = exact_pool_sum(ones, geometry) if not attrs.get("count_include_pad", 0) else kh * kw
    return [_requantize_real(total / count, y_scale, y_zp, x.dtype)]


def qlinear_concat(ctx: Context, inputs: list, attrs: dict) -> list:
    y_scale, y_zp, *triples = inputs
    reals = [
        _minus(triples[i], triples[i + 2]) * triples[i + 1].astype(np.float64)
        for i in range(0, len(triples), 3)
    ]
    joined = np.concatenate(reals, axis=attrs["axis"])
    return [_requantize_real(joined, y_scale, y_zp, triples[0].dtype)]


def _lookup(function: Callable[[np.ndarray, dict], np.ndarray]) -> Kernel:
    """QLinearSigmoid / QLinearLeakyRelu: dequantize, apply, requantize."""

    def kernel(ctx: Context, inputs: list, attrs: dict) -> list:
        x, x_scale, x_zp, y_scale, y_zp = _padded(inputs, 5)
        real = _minus(x, x_zp) * x_scale.astype(np.float64)
        return [_requantize_real(function(real, attrs), y_scale, y_zp, x.dtype)]

    return kernel


def relu(ctx: Context, inputs: list, attrs: dict) -> list:
    return [np.maximum(inputs[0], np.zeros((), inputs[0].dtype))]


def clip(ctx: Context, inputs: list, attrs: dict) -> list:
    x, low, high = _padded(inputs, 3)
    low = attrs.get("min", low)
    high = attrs.get("max", high)
    return [np.clip(x, low, high).astype(x.dtype)]


def identity(ctx: Context, inputs: list, attrs: dict) -> list:
    return [inputs[0]]


KERNELS: dict[tuple[str, str], Kernel] = {
    ("", "QuantizeLinear"): quantize_linear_kernel,
    ("", "DequantizeLinear"): dequantize_linear_kernel,
    ("", "DynamicQuantizeLinear"): dynamic_quantize_linear_kernel,
    ("", "ConvInteger"): conv_integer,
    ("", "MatMulInteger"): matmul_integer,
    ("", "QLinearConv"): qlinear_conv,
    ("", "QLinearMatMul"): qlinear_matmul,
    ("", "Identity"): identity,
    (MS, "QGemm"): qgemm,
    (MS, "MatMulIntegerToFloat"): matmul_integer_to_float,
    (MS, "QLinearAdd"): _elementwise(np.add),
    (MS, "QLinearMul"): _elementwise(np.multiply),
    (MS, "QLinearGlobalAveragePool"): qlinear_global_average_pool,
    (MS, "QLinearAveragePool"): qlinear_average_pool,
    (MS, "QLinearConcat"): qlinear_concat,
    (MS, "QLinearSigmoid"): _lookup(lambda x, a: 1 / (1 + np.exp(-x))),
    (MS, "QLinearLeakyRelu"): _lookup(lambda x, a: np.where(x >= 0, x, a.get("alpha", 0.01) * x)),
}
INTEGER_ONLY = {("", "Relu"): relu, ("", "Clip"): clip}  # exact on codes: used on int inputs
