"""One kernel per integer op, named after the op, with the spec's input names.

Each takes the run's `Context`, the node's inputs (None for an absent optional input) and its
attributes, and returns the outputs. `KERNELS` maps (domain, op type) to the kernel.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

import qdq.engine.elementwise as elementwise
from qdq.engine.compiled import conv_accumulator, dense_weights
from qdq.engine.depthwise import max_pool_pixels
from qdq.engine.integer import (
    EXACT_LIMIT,
    INT16,
    Accumulator,
    exact_conv,
    exact_matmul,
    exact_pool_sum,
    requantize_output,
    saturating_conv16,
    saturating_matmul16,
)
from qdq.engine.mlas import (
    apply_table,
    logistic,
    lookup_table,
    qlinear_add,
    qlinear_mul,
    requantize_concat,
)
from qdq.engine.mlas import average_pool as mlas_average_pool
from qdq.engine.mlas import global_average_pool as mlas_global_average_pool
from qdq.engine.pixels import as_pixels, from_pixels
from qdq.engine.quantize_ops import dequantize_linear, dynamic_quantize_linear, quantize_linear
from qdq.errors import ModelError
from qdq.fixedpoint import quantize_multiplier
from qdq.onnx.conv import ConvGeometry

MS = "com.microsoft"
# How a 32-bit accumulator becomes the output code: the fixed-point multiplier M0 * 2^-n
# (gemmlowp/TFLite), ONNX Runtime's float32 arithmetic (MLAS), or the ONNX definition read
# literally in float64 (docs/engine.md, "Requantization").
Requant = Literal["fixed", "float", "spec"]


@dataclass
class Context:
    """Settings of one run and what it observed per node."""

    requant: Requant = "fixed"
    accumulator_bits: int = 32
    accumulators: dict[str, Accumulator] = field(default_factory=dict)
    multipliers: dict[bytes, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    node: str = ""
    compiled: bool = False  # the Numba kernels (`engine/compiled.py`), else NumPy's
    weights: dict[str, tuple] = field(default_factory=dict)  # per node: prepared constants
    position: int = -1  # the node's place in the graph
    # per (position, slot): the compiled kernels' result arrays of the last run, reused
    # (`Engine.run`); None: fresh arrays
    buffers: dict[tuple[int, str], np.ndarray] | None = None

    def empty(self, shape: tuple[int, ...], dtype: np.dtype, slot: str = "out") -> np.ndarray:
        """An uninitialized array for the node's `slot`: the one it had in the engine's last
        run where `buffers` keeps them, so that a run touches memory it already holds (fresh
        memory costs a page fault per 4 KiB on first write: 40% of PP-OCR's classifier's run)."""
        if self.buffers is None:
            return np.empty(shape, dtype)
        key = (self.position, slot)
        buffer = self.buffers.get(key)
        if buffer is None or buffer.shape != tuple(shape) or buffer.dtype != dtype:
            buffer = self.buffers[key] = np.empty(shape, dtype)
        return buffer

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

    def accumulate_count(self, size: int) -> None:
        """Count `size` accumulations known to fit (the compiled path's bound)."""
        self.accumulators.setdefault(self.node, Accumulator(self.accumulator_bits)).total += size

    def accumulate(self, acc: np.ndarray) -> np.ndarray:
        """The node's int accumulator through the simulated hardware accumulator."""
        meter = self.accumulators.setdefault(self.node, Accumulator(self.accumulator_bits))
        return meter.clamp(acc)

    def conv(
        self, x: np.ndarray, w: np.ndarray, g: ConvGeometry, bias: np.ndarray | None
    ) -> np.ndarray:
        """The accumulator of a convolution of centred codes plus the bias: exact, then through
        a 32-bit accumulator; or summed as a 16-bit datapath does (`saturating_conv16`)."""
        shape = (1, -1, 1, 1)
        if self.accumulator_bits == 16:
            return self._saturate(*saturating_conv16(x, w, g), bias, shape)
        acc = exact_conv(x, w, g)
        return self.accumulate(acc if bias is None else acc + bias.astype(np.int64).reshape(shape))

    def matmul(self, a: np.ndarray, b: np.ndarray, bias: np.ndarray | None = None) -> np.ndarray:
        """`conv` for a matrix product of centred codes (a bias broadcasts like numpy's +)."""
        if self.accumulator_bits == 16:
            return self._saturate(*saturating_matmul16(a, b), bias, None)
        acc = exact_matmul(a, b)
        return self.accumulate(acc if bias is None else acc + bias.astype(np.int64))

    def _saturate(self, acc, saturated, bias, shape) -> np.ndarray:
        """A saturating sum's result with the bias added last (saturating too), recorded."""
        if bias is not None:
            acc = acc + (bias.astype(np.int64) if shape is None else bias.reshape(shape))
            saturated = saturated | (acc < INT16[0]) | (acc > INT16[1])
            acc = np.clip(acc, *INT16)
        self.accumulators.setdefault(self.node, Accumulator(16)).record(saturated)
        return acc


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


def _one_pass(ctx: Context, attrs: dict) -> bool:
    """Whether a QuantizeLinear/DequantizeLinear may take `elementwise`'s compiled pass: the
    compiled kernels, no blocks and no output type of its own (the pass checks the rest)."""
    return ctx.compiled and not attrs.get("block_size", 0) and not attrs.get("output_dtype", 0)


def quantize_linear_kernel(ctx: Context, inputs: list, attrs: dict) -> list:
    x, scale, zero_point = _padded(inputs, 3)
    if (
        _one_pass(ctx, attrs)
        and (codes := elementwise.quantize(x, scale, zero_point, ctx.empty)) is not None
    ):
        return [codes]
    keys = ("axis", "block_size", "saturate", "output_dtype")
    return [quantize_linear(x, scale, zero_point, **{k: attrs[k] for k in keys if k in attrs})]


def dequantize_linear_kernel(ctx: Context, inputs: list, attrs: dict) -> list:
    x, scale, zero_point = _padded(inputs, 3)
    if (
        _one_pass(ctx, attrs)
        and (real := elementwise.dequantize(x, scale, zero_point, ctx.empty)) is not None
    ):
        return [real]
    keys = ("axis", "block_size", "output_dtype")
    return [dequantize_linear(x, scale, zero_point, **{k: attrs[k] for k in keys if k in attrs})]


def dynamic_quantize_linear_kernel(ctx: Context, inputs: list, attrs: dict) -> list:
    return list(dynamic_quantize_linear(inputs[0]))


def conv_integer(ctx: Context, inputs: list, attrs: dict) -> list:
    x, w, x_zero_point, w_zero_point = _padded(inputs, 4)
    geometry = ConvGeometry.from_attributes(attrs, x.shape, w.shape)
    acc = ctx.conv(_minus(x, x_zero_point), _minus(w, w_zero_point, axis=0), geometry, None)
    return [acc.astype(np.int32)]


def _product(
    ctx: Context,
    a: np.ndarray,
    a_zero_point: np.ndarray | None,
    b: np.ndarray,
    b_zero_point: np.ndarray | None,
) -> np.ndarray:
    """The accumulated integer product of two code tensors less their zero points (a's per
    row, b's per column)."""
    return ctx.matmul(
        _minus(a, a_zero_point, axis=a.ndim - 2), _minus(b, b_zero_point, axis=b.ndim - 1)
    )


def matmul_integer(ctx: Context, inputs: list, attrs: dict) -> list:
    a, b, a_zero_point, b_zero_point = _padded(inputs, 4)
    return [_product(ctx, a, a_zero_point, b, b_zero_point).astype(np.int32)]


def qlinear_conv(ctx: Context, inputs: list, attrs: dict) -> list:
    x, x_scale, x_zp, w, w_scale, w_zp, y_scale, y_zp, bias = _padded(inputs, 9)
    geometry = ConvGeometry.from_attributes(attrs, x.shape, w.shape)
    if ctx.compiled and ctx.accumulator_bits == 32 and x.ndim == 4:
        codes = _qlinear_conv_compiled(ctx, inputs, geometry)
        if codes is not None:
            return [codes]
    acc = ctx.conv(_minus(x, x_zp), _minus(w, w_zp, axis=0), geometry, bias)
    multiplier = x_scale * w_scale / y_scale  # in the scales' own precision, as ONNX computes
    if np.size(multiplier) > 1:
        multiplier = multiplier.reshape(1, -1, 1, 1)
    dtype = _out_dtype(y_zp, x.dtype)
    return [ctx.requantize(acc, multiplier, _zp(y_zp, dtype), dtype)]


def _qlinear_conv_compiled(ctx: Context, inputs: list, g: ConvGeometry) -> np.ndarray | None:
    """QLinearConv through `engine/compiled.py`: the same codes as the NumPy path (None where
    it has no kernel: a depthwise sum that float32 cannot hold exactly)."""
    x, x_scale, x_zp, w, w_scale, w_zp, y_scale, y_zp, bias = _padded(inputs, 9)
    dtype = _out_dtype(y_zp, x.dtype)
    zp = int(_zp(x_zp, x.dtype))
    m = w.shape[0]
    depthwise = w.shape[1] == 1 and g.group == m == x.shape[1]
    constants = (w, w_zp, x_scale, w_scale, y_scale, bias)
    cached = ctx.weights.get(ctx.node)
    if cached is None or any(a is not b for a, b in zip(cached[0], constants, strict=True)):
        centred = _minus(w, w_zp, axis=0)
        # depthwise weights channels-last (kh, kw, C): the kernel vectorizes across channels
        prepared = centred[:, 0].transpose(1, 2, 0) if depthwise else centred.reshape(m, -1)
        prepared = np.ascontiguousarray(prepared, np.float32)
        dense = not depthwise and g.group == 1
        multiplier = np.broadcast_to(np.asarray(x_scale * w_scale / y_scale), (m,))
        biases = np.zeros(m, np.int32) if bias is None else bias.astype(np.int32)
        cached = (
            constants,
            prepared,
            dense_weights(prepared, x.shape[1]) if dense else None,
            int(np.abs(centred).max(initial=0)),
            # the largest sum of |w| over one output's terms: with max |x - z_x|, a bound on
            # every partial sum in any order, far below K * max |w| on real filters
            int(np.abs(centred).reshape(m, -1).sum(axis=1).max(initial=0)),
            multiplier,
            biases,
            int(np.abs(biases).max(initial=0)),
        )
        ctx.weights[ctx.node] = cached  # prepared once per set of constant tensors
    _, weights, by_pixel, w_reach, w_norm, multiplier, bias, bias_reach = cached
    length = w[0].size  # K, the terms of each sum
    info = np.iinfo(x.dtype)
    reach = max(info.max - zp, zp - info.min)  # max |x - z_x| the codes allow
    if reach * w_norm >= 2**24:  # what these codes reach
        reach = max(int(x.max(initial=zp)) - zp, zp - int(x.min(initial=zp)))
    bound = reach * w_norm  # |any partial sum|, at most
    if bound >= EXACT_LIMIT:
        raise ModelError("its integer sums can exceed 2^53, past what the engine sums exactly")
    # products per exact float32 partial sum: every one when the bound allows
    chunk = length if bound < 2**24 else (2**24 - 1) // max(reach * w_reach, 1)
    if depthwise and chunk < length:  # the depthwise kernel sums in float32
        return None
    if ctx.requant == "float" and bound + bias_reach < 2**31:
        y = int(_zp(y_zp, dtype))
        limits = np.iinfo(dtype)
        low, high = np.float32(limits.min - y), np.float32(limits.max - y)
        scale = multiplier.astype(np.float32)
        fused = (bias, scale, y, low, high, dtype)  # no sum with its bias can overflow int32
        codes = conv_accumulator(x, zp, weights, g, chunk, fused, by_pixel, ctx.empty)
        ctx.accumulate_count(codes.size)
        return codes
    acc = conv_accumulator(x, zp, weights, g, chunk)
    total = ctx.accumulate(acc.astype(np.int64) + bias.reshape(1, -1, 1, 1))
    return ctx.requantize(total, multiplier.reshape(1, -1, 1, 1), _zp(y_zp, dtype), dtype)


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
    acc = ctx.matmul(a_values, b_values, c)
    scale = np.float32(attrs.get("alpha", 1.0)) * a_scale * b_scale
    if y_scale is None:
        if ctx.requant == "spec":
            return [(acc.astype(np.float64) * scale).astype(np.float32)]
        return [acc.astype(np.float32) * scale.astype(np.float32)]  # MLAS: float32(acc) * scale
    dtype = _out_dtype(y_zp, a.dtype)
    return [ctx.requantize(acc, scale / y_scale, _zp(y_zp, dtype), dtype)]


def _elementwise(op: Callable[[np.ndarray, np.ndarray], np.ndarray], mlas_op) -> Kernel:
    """QLinearAdd / QLinearMul: real values combined, then requantized to C's grid ("spec"), or
    ONNX Runtime's float32 arithmetic for them (`engine/mlas.py`)."""

    def kernel(ctx: Context, inputs: list, attrs: dict) -> list:
        a, a_scale, a_zp, b, b_scale, b_zp, c_scale, c_zp = _padded(inputs, 8)
        if ctx.requant != "spec":
            zero = np.zeros((), a.dtype)
            a_zp, b_zp, c_zp = (zero if z is None else z for z in (a_zp, b_zp, c_zp))
            return [mlas_op(a, a_scale, a_zp, b, b_scale, b_zp, c_scale, c_zp, ctx.compiled)]
        real_a = _minus(a, a_zp) * a_scale.astype(np.float64)
        real_b = _minus(b, b_zp) * b_scale.astype(np.float64)
        return [_requantize_real(op(real_a, real_b), c_scale, c_zp, a.dtype)]

    return kernel


def _requantize_real(real: np.ndarray, scale: np.ndarray, zp: np.ndarray | None, dtype):
    """Round real results onto an output grid in float64 (the ONNX definition, "spec")."""
    dtype = _out_dtype(zp, dtype)
    info = np.iinfo(dtype)
    codes = np.rint(real / scale.astype(np.float64)) + _zp(zp, dtype).astype(np.float64)
    return np.clip(codes, info.min, info.max).astype(dtype)


def qlinear_global_average_pool(ctx: Context, inputs: list, attrs: dict) -> list:
    x, x_scale, x_zp, y_scale, y_zp = inputs[:5]
    axes = (1, 2) if attrs.get("channels_last", 0) else tuple(range(2, x.ndim))
    if ctx.requant != "spec":
        return [mlas_global_average_pool(x, x_scale, x_zp, y_scale, y_zp, axes)]
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
    include_pad = bool(attrs.get("count_include_pad", 0))
    if ctx.requant != "spec":
        x_zp, y_zp = (np.zeros((), x.dtype) if z is None else z for z in (x_zp, y_zp))
        return [mlas_average_pool(x, x_scale, x_zp, y_scale, y_zp, geometry, include_pad)]
    real = _minus(x, x_zp).astype(np.float64) * x_scale.astype(np.float64)
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
    reals = [_minus(x, z) * s.astype(np.float64) for x, s, z in groups]
    joined = np.concatenate(reals, axis=attrs["axis"])
    return [_requantize_real(joined, y_scale, y_zp, triples[0].dtype)]


def _lookup(
    function: Callable[[np.ndarray, dict], np.ndarray],
    in_float32: Callable[[np.ndarray, dict], np.ndarray] | None = None,
) -> Kernel:
    """QLinearSigmoid / QLinearLeakyRelu: dequantize, apply, requantize ("spec"), or ONNX
    Runtime's 256-entry table built in float32 (`lookup_table`) with `in_float32`, ONNX
    Runtime's own evaluation of the function, where it has one."""
    table_function = in_float32 or function

    def kernel(ctx: Context, inputs: list, attrs: dict) -> list:
        x, x_scale, x_zp, y_scale, y_zp = _padded(inputs, 5)
        if ctx.requant != "spec":
            x_zp, y_zp = (np.zeros((), x.dtype) if z is None else z for z in (x_zp, y_zp))
            table = lookup_table(
                x_scale, x_zp, y_scale, y_zp, x.dtype, lambda v: table_function(v, attrs)
            )
            return [apply_table(x, table)]
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


def max_pool(ctx: Context, inputs: list, attrs: dict) -> list | None:
    """MaxPool of integer codes (exact: a maximum), 2-D, floor mode, one output; padding
    never wins (the type's minimum). Other forms return None: ONNX Runtime runs them."""
    x = inputs[0]
    if x.ndim != 4 or attrs.get("ceil_mode", 0) or attrs.get("storage_order", 0):
        return None
    kernel = tuple(attrs["kernel_shape"])
    geometry = ConvGeometry.from_attributes(attrs | {"group": 1}, x.shape, (1, 1, *kernel))
    top, left, bottom, right = geometry.pads
    (kh, kw), (dh, dw), (sh, sw) = geometry.kernel, geometry.dilations, geometry.strides
    if ctx.compiled:  # channels-last, as the compiled convolutions leave it
        height, width = x.shape[2] + top + bottom, x.shape[3] + left + right
        oh, ow = (height - (kh - 1) * dh - 1) // sh + 1, (width - (kw - 1) * dw - 1) // sw + 1
        out = ctx.empty((x.shape[0], oh, ow, x.shape[1]), x.dtype)
        lowest = np.iinfo(x.dtype).min
        max_pool_pixels(as_pixels(x), kh, kw, sh, sw, dh, dw, top, left, lowest, out)
        return [from_pixels(out)]
    lowest = np.iinfo(x.dtype).min
    padded = np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)), constant_values=lowest)
    span = ((kh - 1) * dh + 1, (kw - 1) * dw + 1)
    windows = sliding_window_view(padded, span, axis=(2, 3))[:, :, ::sh, ::sw, ::dh, ::dw]
    out = windows[..., 0, 0].copy()
    for i in range(kh):  # a pass per tap: NumPy reduces a strided window view slowly
        for j in range(kw):
            np.maximum(out, windows[..., i, j], out=out)
    return [out]


def reshape(ctx: Context, inputs: list, attrs: dict) -> list:
    """Reshape: a 0 in the shape keeps the input's dim there (unless allowzero), -1 infers."""
    x, shape = inputs[:2]
    keep = not attrs.get("allowzero", 0)
    dims = [x.shape[i] if d == 0 and keep else int(d) for i, d in enumerate(shape)]
    return [x.reshape(dims)]


def flatten(ctx: Context, inputs: list, attrs: dict) -> list:
    x = inputs[0]
    axis = attrs.get("axis", 1)
    axis = axis + x.ndim if axis < 0 else axis
    return [x.reshape(int(np.prod(x.shape[:axis])), int(np.prod(x.shape[axis:])))]


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
    (MS, "QLinearAdd"): _elementwise(np.add, qlinear_add),
    (MS, "QLinearMul"): _elementwise(np.multiply, qlinear_mul),
    (MS, "QLinearGlobalAveragePool"): qlinear_global_average_pool,
    (MS, "QLinearAveragePool"): qlinear_average_pool,
    (MS, "QLinearConcat"): qlinear_concat,
    (MS, "QLinearSigmoid"): _lookup(lambda x, a: 1 / (1 + np.exp(-x)), lambda x, a: logistic(x)),
    (MS, "QLinearLeakyRelu"): _lookup(
        lambda x, a: np.where(x >= 0, x, x.dtype.type(a.get("alpha", 0.01)) * x)
    ),
}
# exact on codes: used on int inputs (a kernel returning None leaves the node to ONNX Runtime)
INTEGER_ONLY: dict[tuple[str, str], Kernel] = {
    ("", "Relu"): relu,
    ("", "Clip"): clip,
    ("", "MaxPool"): max_pool,
    ("", "Reshape"): reshape,
    ("", "Flatten"): flatten,
}
