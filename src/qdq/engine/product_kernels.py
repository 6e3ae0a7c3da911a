"""Kernels of the ops that sum integer products: ConvInteger, MatMulInteger, QLinearConv,
QLinearMatMul and com.microsoft QGemm and MatMulIntegerToFloat. Each sums the centred codes in
the run's accumulator (`Context.conv`, `Context.matmul`) and requantizes; QLinearConv also
runs `compiled.conv_accumulator` on the compiled path.
"""

from __future__ import annotations

import numpy as np

from qdq.engine.compiled import conv_accumulator, dense_weights
from qdq.engine.context import Context, Kernel, minus, out_dtype, padded_inputs, zp_or_zero
from qdq.engine.integer import EXACT_LIMIT
from qdq.errors import ModelError
from qdq.onnx.conv import ConvGeometry


def conv_integer(ctx: Context, inputs: list, attrs: dict) -> list | None:
    x, w, x_zero_point, w_zero_point = padded_inputs(inputs, 4)
    if x.ndim == 3:
        return _one_row(conv_integer, ctx, inputs, attrs, 1)
    if x.ndim != 4:  # a 3-D convolution: ONNX Runtime's kernel (`Executor.trace`)
        return None
    geometry = ConvGeometry.from_attributes(attrs, x.shape, w.shape)
    acc = ctx.conv(minus(x, x_zero_point), minus(w, w_zero_point, axis=0), geometry, None)
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
        minus(a, a_zero_point, axis=a.ndim - 2), minus(b, b_zero_point, axis=b.ndim - 1)
    )


def matmul_integer(ctx: Context, inputs: list, attrs: dict) -> list:
    a, b, a_zero_point, b_zero_point = padded_inputs(inputs, 4)
    return [_product(ctx, a, a_zero_point, b, b_zero_point).astype(np.int32)]


def qlinear_conv(ctx: Context, inputs: list, attrs: dict) -> list | None:
    x, x_scale, x_zp, w, w_scale, w_zp, y_scale, y_zp, bias = padded_inputs(inputs, 9)
    if x.ndim == 3:
        return _one_row(qlinear_conv, ctx, inputs, attrs, 3)
    if x.ndim != 4:  # a 3-D convolution: ONNX Runtime's kernel (`Executor.trace`)
        return None
    geometry = ConvGeometry.from_attributes(attrs, x.shape, w.shape)
    if ctx.compiled and ctx.accumulator_bits == 32:
        codes = _qlinear_conv_compiled(ctx, inputs, geometry)
        if codes is not None:
            return [codes]
    acc = ctx.conv(minus(x, x_zp), minus(w, w_zp, axis=0), geometry, bias)
    multiplier = x_scale * w_scale / y_scale  # in the scales' own precision, as ONNX computes
    if np.size(multiplier) > 1:
        multiplier = multiplier.reshape(1, -1, 1, 1)
    dtype = out_dtype(y_zp, x.dtype)
    return [ctx.requantize(acc, multiplier, zp_or_zero(y_zp, dtype), dtype)]


def _one_row(kernel: Kernel, ctx: Context, inputs: list, attrs: dict, weight: int) -> list | None:
    """A 1-D convolution (N, C, L) run as the 2-D one of height 1 that it is, exactly: the
    input and the weight (input `weight`) get an axis of 1, the attributes a first entry of
    1 (kernel, strides, dilations) or 0 (pads); the output loses that axis again."""
    rows = list(inputs)
    for i in (0, weight):
        rows[i] = rows[i][:, :, None]
    two = dict(attrs)
    for name in ("kernel_shape", "strides", "dilations"):
        if name in attrs:
            two[name] = [1, *attrs[name]]
    if "pads" in attrs:
        two["pads"] = [0, attrs["pads"][0], 0, attrs["pads"][1]]
    outputs = kernel(ctx, rows, two)
    return None if outputs is None else [outputs[0][:, :, 0]]


def _qlinear_conv_compiled(ctx: Context, inputs: list, g: ConvGeometry) -> np.ndarray | None:
    """QLinearConv through `engine/compiled.py`: the same codes as the NumPy path (None where
    it has no kernel: a depthwise sum that float32 cannot hold exactly)."""
    x, x_scale, x_zp, w, w_scale, w_zp, y_scale, y_zp, bias = padded_inputs(inputs, 9)
    dtype = out_dtype(y_zp, x.dtype)
    zp = int(zp_or_zero(x_zp, x.dtype))
    m = w.shape[0]
    depthwise = w.shape[1] == 1 and g.group == m == x.shape[1]
    constants = (w, w_zp, x_scale, w_scale, y_scale, bias)
    # reused only for the model's constants (read-only): a weight computed at run time comes
    # in the same reused array each run, with other values
    kept = not any(a.flags.writeable for a in constants if a is not None)
    cached = ctx.weights.get(ctx.position) if kept else None
    if cached is None or any(a is not b for a, b in zip(cached[0], constants, strict=True)):
        centred = minus(w, w_zp, axis=0)
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
        if kept:
            ctx.weights[ctx.position] = cached  # prepared once per set of constant tensors
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
        y = int(zp_or_zero(y_zp, dtype))
        limits = np.iinfo(dtype)
        low, high = np.float32(limits.min - y), np.float32(limits.max - y)
        scale = multiplier.astype(np.float32)
        fused = (bias, scale, y, low, high, dtype)  # no sum with its bias can overflow int32
        codes = conv_accumulator(x, zp, weights, g, chunk, fused, by_pixel, ctx.empty)
        ctx.accumulate_count(codes.size)
        return codes
    acc = conv_accumulator(x, zp, weights, g, chunk)
    total = ctx.accumulate(acc.astype(np.int64) + bias.reshape(1, -1, 1, 1))
    return ctx.requantize(total, multiplier.reshape(1, -1, 1, 1), zp_or_zero(y_zp, dtype), dtype)


def qlinear_matmul(ctx: Context, inputs: list, attrs: dict) -> list:
    a, a_scale, a_zp, b, b_scale, b_zp, y_scale, y_zp = inputs[:8]
    acc = _product(ctx, a, a_zp, b, b_zp)
    if np.size(a_scale) > 1:  # one per row of A (its M), where b's are one per column
        a_scale = np.reshape(a_scale, (-1, 1))
    multiplier = a_scale * b_scale / y_scale
    dtype = out_dtype(y_zp, a.dtype)
    return [ctx.requantize(acc, multiplier, zp_or_zero(y_zp, dtype), dtype)]


def matmul_integer_to_float(ctx: Context, inputs: list, attrs: dict) -> list:
    """com.microsoft MatMulIntegerToFloat: the int32 product of the codes, scaled to float (a
    MatMul whose output nothing reads as int8), plus an optional float bias."""
    a, b, a_scale, b_scale, a_zp, b_zp, bias = padded_inputs(inputs, 7)
    acc, scale = _product(ctx, a, a_zp, b, b_zp), a_scale * b_scale
    if ctx.requant == "spec":
        out = (acc.astype(np.float64) * scale.astype(np.float64)).astype(np.float32)
    else:  # MLAS: float32(acc) * float32(scale), which rounds the sum first past 2^24
        out = acc.astype(np.float32) * scale.astype(np.float32)
    if bias is not None:  # added in float32 to the rounded product, as ONNX Runtime adds it
        out += bias.astype(np.float32)
    return [out]


def qgemm(ctx: Context, inputs: list, attrs: dict) -> list:
    """com.microsoft QGemm: alpha * A' B' + C with int32 C; quantized output when y_scale given."""
    a, a_scale, a_zp, b, b_scale, b_zp, c, y_scale, y_zp = padded_inputs(inputs, 9)
    a_values = minus(a, a_zp)
    b_values = minus(b, b_zp, axis=0 if attrs.get("transB", 0) else 1)
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
    dtype = out_dtype(y_zp, a.dtype)
    return [ctx.requantize(acc, scale / y_scale, zp_or_zero(y_zp, dtype), dtype)]
