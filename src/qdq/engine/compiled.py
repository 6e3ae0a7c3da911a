"""Compiled convolutions (Numba, the optional `fast` extra): the engine's fast path.

Same arithmetic as the NumPy reference in `integer.py` and `mlas.py`, in fewer passes. A dense
convolution runs a cache-sized tile of output positions at a time: im2col (`im2col.py`) writes
each position's terms as a row, one product (int8 codes with VNNI, `vnni.py`, where the CPU and
the weights allow; else float32 BLAS on the zero-point-free values, exact while every partial
sum stays below 2^24, `integer.exact_dtype`), and ONNX Runtime's requantization
(`requantize_mlas`) with the bias, straight into the output codes. Dense and depthwise
(`depthwise.py`) convolutions write their codes channels-last (`pixels.py`): the next one reads
a pixel's channels, and a window's row of taps, as contiguous runs, and no layer transposes
its input. `tests/engine/test_fast_paths.py` checks the kernels against the NumPy reference on
real layer shapes in both layouts, `tests/engine/test_compiled.py` on whole models.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

import qdq.engine.vnni as vnni
from qdq.engine.depthwise import depthwise, depthwise_requantized
from qdq.engine.im2col import (
    columns,
    padded_planes,
    pixel_columns,
    pixel_rows,
    pixels,
    pointwise_columns,
)
from qdq.engine.jit import compile_kernel
from qdq.engine.pixels import as_pixels, fresh, from_pixels
from qdq.onnx.conv import ConvGeometry

TILE = 1 << 18  # float32 values in a tile's columns and product together: 1 MiB, within L2
# dense convolutions multiply int8 codes with VNNI where the CPU has it (tests turn it off to
# check the float32 path)
INT8_PRODUCTS = vnni.available()


def _requantize_rows(product, bias, scale, zero_point, low, high, first, out):
    """`_requantize_mlas` of a product (positions, M or more: float32 or int32 sums) into
    rows `first`, ... of out (P, M). The sum with the bias wraps to int32 as MLAS's does:
    exact whenever the true sum fits, even if the product or the bias alone wrapped."""
    for t in range(product.shape[0]):
        source, target = product[t], out[first + t]
        for m in range(target.size):
            value = np.float32(np.int32(np.int32(source[m]) + bias[m])) * scale[m]
            target[m] = np.int32(np.rint(min(max(value, low), high))) + zero_point


def _requantize_columns(product, bias, scale, zero_point, low, high, first, out):
    """`_requantize_mlas` of a product over output positions `first`, ... (`im2col.columns`) into
    out (N, M, P): float32(int32(product[m, r - first]) + bias[m]) * scale[m], clamped,
    rounded half to even, plus the zero point."""
    channels, count = product.shape
    plane = out.shape[2]
    t = 0
    while t < count:
        n = (first + t) // plane
        p0 = first + t - n * plane
        run = min(plane - p0, count - t)
        for m in range(channels):
            b = bias[m]
            s = scale[m]
            source, target = product[m, t : t + run], out[n, m, p0 : p0 + run]
            for q in range(run):
                value = np.float32(np.int32(source[q]) + b) * s
                target[q] = np.int32(np.rint(min(max(value, low), high))) + zero_point
        t += run


def _requantize_mlas(acc, bias, scale, zero_point, low, high, out):
    """`requantize_mlas` over (N, M, P) with the int32 bias added first, fused in one pass."""
    n_count, channels, size = acc.shape
    for n in range(n_count):
        for m in range(channels):
            b = bias[m]
            s = scale[m]
            for p in range(size):
                value = np.float32(np.int32(acc[n, m, p]) + b) * s
                value = min(max(value, low), high)
                out[n, m, p] = np.int32(np.rint(value)) + zero_point


requantize_rows = compile_kernel(_requantize_rows)
requantize_columns = compile_kernel(_requantize_columns)
requantize_fused = compile_kernel(_requantize_mlas)


@dataclass(frozen=True)
class DenseWeights:
    """A dense convolution's centred weights as `_fused_pixels` multiplies them: float32
    (K, M), terms in `im2col.pixel_columns`' order, and, where the CPU has VNNI and every weight
    fits int8, `vnni.pack_weights`' codes and column sums."""

    floats: np.ndarray
    codes: tuple[np.ndarray, np.ndarray] | None


def dense_weights(weights: np.ndarray, channels: int) -> DenseWeights:
    """Dense weights (M, C * kh * kw) in both forms `_fused_pixels` reads."""
    m = weights.shape[0]
    taps = weights.reshape(m, channels, -1).transpose(0, 2, 1).reshape(m, -1)
    floats = np.ascontiguousarray(taps.T)
    return DenseWeights(floats, vnni.pack_weights(floats) if vnni.available() else None)


def conv_accumulator(
    x: np.ndarray,
    x_zp: int,
    weights: np.ndarray,
    g: ConvGeometry,
    chunk: int,
    requantize: tuple | None = None,
    by_pixel: DenseWeights | None = None,
    allocate: Callable = fresh,
) -> np.ndarray:
    """The exact accumulator of a convolution (N, M, OH, OW, maybe a view of channels-last
    memory) without bias; given `requantize` = (int32 bias, float32 scale, zero point, low,
    high, dtype) per output channel, the output codes of `_requantize_mlas` instead, fused.

    `weights` are the codes less their zero points in float32: (M, C / group * kh * kw) for
    dense and grouped convolutions, (kh, kw, C) for depthwise ones; `by_pixel` the dense
    ones as `dense_weights` arranges them (derived when not given). Products run through BLAS
    in float32 over at most `chunk` terms of K at a time, the most whose partial sums stay
    below 2^24 (exact, `integer.exact_dtype`); longer sums add those float32 products in
    float64 (exact below 2^53). Depthwise and fused dense convolutions read x in either
    layout and write channels-last memory, so that the next one reads its pixels' channels
    contiguously, into arrays from `allocate` (`fresh`).
    """
    n, c, height, width = x.shape
    top, left = g.pads[:2]
    (kh, kw), (dh, dw), (sh, sw) = g.kernel, g.dilations, g.strides
    oh, ow = g.output_size(height, width)
    zp = np.int32(x_zp)
    if weights.ndim == 3:  # depthwise
        taps = (sh, sw, dh, dw, top, left, oh, ow)
        if requantize is None:
            out = np.empty((n, oh, ow, c), np.float32)
            depthwise(as_pixels(x), zp, weights, *taps, out)
        else:
            bias, scale, y_zp, low, high, dtype = requantize
            out = allocate((n, oh, ow, c), dtype)
            codes = (bias, scale, np.int32(y_zp), low, high)
            depthwise_requantized(as_pixels(x), zp, weights, *taps, *codes, out)
        return from_pixels(out)
    geometry = (kh, kw, sh, sw, dh, dw, top, left, oh, ow)
    m, k = weights.shape[0], c * kh * kw
    if requantize is not None and chunk >= weights.shape[1]:
        if g.group == 1:
            by_pixel = dense_weights(weights, c) if by_pixel is None else by_pixel
            return _fused_pixels(x, zp, by_pixel, geometry, requantize, allocate)
        out = _fused_conv(x, zp, weights, g.group, geometry, requantize)
        return out.reshape(n, m, oh, ow)
    # the operand as (K, N * P): one BLAS product over every image (small images would
    # otherwise spend their time in N tiny products); the result is read back as (N, M, P)
    operand = np.empty((k, n * oh * ow), np.float32)
    columns(padded_planes(x, zp, *geometry), *_taps(geometry), 0, operand)
    mg, kg = m // g.group, weights.shape[1]
    parts = [
        _product(
            weights[group * mg : (group + 1) * mg], operand[group * kg : (group + 1) * kg], chunk
        )
        for group in range(g.group)
    ]
    product = parts[0] if g.group == 1 else np.concatenate(parts)
    acc = product.reshape(m, n, oh, ow).transpose(1, 0, 2, 3)
    if requantize is None:
        return acc
    bias, scale, y_zp, low, high, dtype = requantize
    out = np.empty((n, m, oh * ow), dtype)
    requantize_fused(acc.reshape(n, m, -1), bias, scale, np.int32(y_zp), low, high, out)
    return out.reshape(n, m, oh, ow)


def _taps(geometry: tuple) -> tuple:
    """`im2col.columns`' geometry from `conv_accumulator`'s (the padding is already applied)."""
    kh, kw, sh, sw, dh, dw, _, _, oh, ow = geometry
    return kh, kw, sh, sw, dh, dw, oh, ow


def _fused_pixels(
    x: np.ndarray,
    zp: np.int32,
    weights: DenseWeights,
    geometry: tuple,
    requantize: tuple,
    allocate: Callable,
) -> np.ndarray:
    """Output codes (N, M, OH, OW, channels-last memory) of a dense convolution, a tile of
    output positions at a time: a row of terms per position (im2col from the pixels, whose
    taps are runs of channels), one product with the weights as (K, M), requantized straight
    into the output's pixels. The product multiplies the codes themselves in int8 with VNNI
    where `INT8_PRODUCTS` and the weights allow (x's zero point then comes off as
    `z_x * sum(w)` in the bias), else their zero-point-free values in float32 BLAS (exact:
    the caller bounds every partial sum below 2^24)."""
    bias, scale, y_zp, low, high, dtype = requantize
    kh, kw, sh, sw, dh, dw, top, left, oh, ow = geometry
    n, channels = x.shape[:2]
    k, m = weights.floats.shape
    codes = weights.codes if INT8_PRODUCTS else None
    if codes is None:
        operand_type, shift, fill, length, columns = np.float32, -zp, 0, k, m
    else:  # int8 codes as unsigned bytes: + 128, and the zero point with them
        offset = 128 if x.dtype == np.int8 else 0
        operand_type, shift, fill = np.uint8, offset, int(zp) + offset
        length, columns = vnni.padded_terms(k), codes[0].size // vnni.padded_terms(k)
        bias = (bias.astype(np.int64) - fill * codes[1].astype(np.int64)).astype(np.int32)
    total = n * oh * ow
    size = np.dtype(operand_type).itemsize
    width = max(256, TILE * 4 // (length * size + columns * 4)) // vnni.ROWS * vnni.ROWS
    width = min(width, max(-(-total // vnni.ROWS), 1) * vnni.ROWS)  # a tile, even of nothing
    operand = allocate((width, length), operand_type, "operand")
    operand[:, k:] = 0  # the terms past K that `vnni.padded_terms` adds
    product = allocate((width, columns), np.float32 if codes is None else np.int32, "product")
    out = allocate((n, oh, ow, m), dtype)
    rows = out.reshape(total, m)
    source = as_pixels(x)
    pointwise = (kh, kw, sh, sw) == (1, 1, 1, 1) and x.shape[2:] == (oh, ow)
    if not pointwise:
        height = max(x.shape[2] + top, (oh - 1) * sh + (kh - 1) * dh + 1)
        span = max(x.shape[3] + left, (ow - 1) * sw + (kw - 1) * dw + 1)
        padded = allocate((n, height, span, channels), operand_type, "padded")
        padded.fill(fill)
        pixels(source, shift, top, left, padded)
    for first in range(0, total, width):
        count = min(width, total - first)
        part = operand[:count]
        if pointwise:
            pixel_rows(source, shift, first, part)
        else:
            pixel_columns(padded, kh, kw, sh, sw, dh, dw, oh, ow, first, part)
        if codes is None:
            np.matmul(part[:, :k], weights.floats, out=product[:count])
        else:  # whole tiles of rows: the rows past `count` are computed and not read
            tiles = -(-count // vnni.ROWS) * vnni.ROWS
            vnni.gemm(operand.ravel(), tiles, length, codes[0], columns, product.ravel())
        requantize_rows(product[:count], bias, scale, np.int32(y_zp), low, high, first, rows)
    return from_pixels(out)


def _fused_conv(
    x: np.ndarray, zp: np.int32, weights: np.ndarray, group: int, geometry: tuple, requantize
) -> np.ndarray:
    """Output codes (N, M, P) of a dense or grouped convolution whose sums float32 holds
    exactly, a tile of output positions at a time: im2col into a cache-sized buffer, one BLAS
    product per group, requantized straight into the output."""
    bias, scale, y_zp, low, high, dtype = requantize
    n, oh, ow = x.shape[0], geometry[-2], geometry[-1]
    m, kg = weights.shape
    k, mg = kg * group, m // group
    total = n * oh * ow
    width = max(1, min(total, max(256, TILE // (k + m))))  # 1 for an empty batch: no tiles
    operand = np.empty(k * width, np.float32)
    result = np.empty(m * width, np.float32)
    out = np.empty((n, m, oh * ow), dtype)
    kh, kw, sh, sw = geometry[:4]
    pointwise = (kh, kw, sh, sw) == (1, 1, 1, 1) and x.shape[2:] == (oh, ow)
    if pointwise:
        flat = x.reshape(n, x.shape[1], -1)
    else:
        padded, taps = padded_planes(x, zp, *geometry), _taps(geometry)
    for first in range(0, total, width):
        count = min(width, total - first)
        part = operand[: k * count].reshape(k, count)
        product = result[: m * count].reshape(m, count)
        if pointwise:
            pointwise_columns(flat, zp, first, part)
        else:
            columns(padded, *taps, first, part)
        for g in range(group):
            rows, terms = slice(g * mg, (g + 1) * mg), slice(g * kg, (g + 1) * kg)
            np.matmul(weights[rows], part[terms], out=product[rows])
        requantize_columns(product, bias, scale, np.int32(y_zp), low, high, first, out)
    return out


def _product(weights: np.ndarray, columns: np.ndarray, chunk: int) -> np.ndarray:
    """weights (M, K) @ columns (K, R), exact: float32 BLAS products over K in chunks."""
    length = weights.shape[1]
    if chunk >= length:
        return weights @ columns
    total = np.zeros((weights.shape[0], columns.shape[1]), np.float64)
    for start in range(0, length, chunk):
        part = slice(start, start + chunk)
        total += weights[:, part] @ columns[part]
    return total
