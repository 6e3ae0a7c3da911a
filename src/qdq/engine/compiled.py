"""Compiled convolution kernels (Numba, the optional `fast` extra): the engine's fast path.

Same arithmetic as the NumPy reference in `integer.py` and `mlas.py`, in fewer passes: im2col
writes the zero-point-free operand straight into float32 (the product then runs through BLAS,
exact below 2^24, `integer.exact_dtype`), a depthwise convolution accumulates in int32 tap by
tap over contiguous rows, and ONNX Runtime's requantization (`requantize_mlas`) runs fused
with the bias over the accumulator. `tests/engine/test_compiled.py` checks both paths give the
same codes on whole models.
"""

from __future__ import annotations

import numpy as np

from qdq.onnx.conv import ConvGeometry

try:
    from numba import njit, uint64
except ImportError:  # the NumPy path serves; `available()` says which
    njit = None
    uint64 = int


def available() -> bool:
    """Whether Numba is installed, so that `kernels="compiled"` can run."""
    return njit is not None


def _compile(function):
    if njit is None:
        return function
    return njit(cache=True, nogil=True, fastmath=False, error_model="numpy")(function)


def _im2col(x, x_zp, kh, kw, sh, sw, dh, dw, top, left, oh, ow, out):
    """out[n, (c*kh + i)*kw + j, y*ow + v] = x[n, c, y*sh - top + i*dh, v*sw - left + j*dw]
    less the zero point, 0 where the window leaves the image (ONNX pads with real zeros)."""
    n_count, channels, height, width = x.shape
    for n in range(n_count):
        for c in range(channels):
            for i in range(kh):
                for j in range(kw):
                    row = (c * kh + i) * kw + j
                    for y in range(oh):
                        h = y * sh - top + i * dh
                        base = y * ow
                        if h < 0 or h >= height:
                            for v in range(ow):
                                out[n, row, base + v] = 0.0
                            continue
                        for v in range(ow):
                            w = v * sw - left + j * dw
                            if 0 <= w < width:
                                out[n, row, base + v] = np.float32(np.int32(x[n, c, h, w]) - x_zp)
                            else:
                                out[n, row, base + v] = 0.0


def _taps(padded, acc, weights, starts, count):
    """acc[v] += padded[starts[k] + v] * weights[k] for every tap k: contiguous rows (SIMD)."""
    for k in range(weights.size):
        weight = weights[k]
        start = uint64(starts[k])
        for v in range(uint64(count)):
            acc[v] += padded[start + v] * weight


def _depthwise(x, x_zp, w, kh, kw, sh, sw, dh, dw, top, left, oh, ow, out):
    """out[n, c] = sum over taps of (x - x_zp) * w[c], in float32 (exact: at most kh*kw*2^15
    per sum). Each plane is copied once, less its zero point, into a zero-padded buffer split
    into `sw` column phases, so every tap of a strided convolution reads a contiguous run."""
    n_count, channels, height, width = x.shape
    ph = (oh - 1) * sh + (kh - 1) * dh + 1
    pw = (ow - 1) * sw + (kw - 1) * dw + 1
    span = (pw + sw - 1) // sw  # columns per phase
    padded = np.zeros(sw * ph * span, np.float32)
    acc = np.zeros(ow, np.float32)
    weights = np.empty(kh * kw, np.float32)
    starts = np.empty(kh * kw, np.int64)
    rows = min(height, ph - top)
    for n in range(n_count):
        for c in range(channels):
            for phase in range(sw):
                # the phase's columns q with q * sw + phase - left inside the image
                first = max(0, (left - phase + sw - 1) // sw)
                last = min(span, (width - 1 + left - phase) // sw + 1)
                for h in range(rows):
                    source = x[n, c, h]
                    base = (phase * ph + h + top) * span
                    for q in range(first, last):
                        value = np.int32(source[q * sw + phase - left]) - x_zp
                        padded[base + q] = np.float32(value)
            for i in range(kh):
                for j in range(kw):
                    weights[i * kw + j] = w[c, i, j]
            for y in range(oh):
                acc[:] = 0
                for i in range(kh):
                    for j in range(kw):
                        column = j * dw
                        row = y * sh + i * dh
                        starts[i * kw + j] = ((column % sw) * ph + row) * span + column // sw
                _taps(padded, acc, weights, starts, ow)
                out[n, c, y, :] = acc


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


def _add_spans(a, b, r_a, r_b, fixed, low, high, out):
    """`mlas.qlinear_add` on (R, S) codes, b (R, S) or one value per row (R, 1): the FMAs as
    float64 products of a code and a float32 ratio (exact) plus a float32, rounded once."""
    rows, size = a.shape
    per_row = b.shape[1] == 1
    for i in range(rows):
        for j in range(size):
            code = b[i, 0] if per_row else b[i, j]
            inner = np.float32(np.float64(code) * r_b + fixed)
            value = np.rint(np.float32(np.float64(a[i, j]) * r_a + np.float64(inner)))
            out[i, j] = min(max(value, low), high)


def _mul_spans(a, a_zp, b, b_zp, ratio, c_zp, low, high, out):
    """`mlas.qlinear_mul` on (R, S) codes, b (R, S) or one value per row (R, 1)."""
    rows, size = a.shape
    per_row = b.shape[1] == 1
    for i in range(rows):
        for j in range(size):
            code = b[i, 0] if per_row else b[i, j]
            product = (np.int32(a[i, j]) - a_zp) * (np.int32(code) - b_zp)
            value = np.rint(np.float32(product) * ratio) + c_zp
            out[i, j] = min(max(value, low), high)


im2col = _compile(_im2col)
_taps = _compile(_taps)
depthwise = _compile(_depthwise)
requantize_fused = _compile(_requantize_mlas)
add_spans = _compile(_add_spans)
mul_spans = _compile(_mul_spans)


def spans(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """a and b as (R, S) and (R, S) or (R, 1) when b equals a's shape or holds one value per
    leading index (b's trailing dims all 1, its leading dims a's); else None."""
    if a.shape == b.shape:
        return a.reshape(1, -1), b.reshape(1, -1)
    if b.ndim != a.ndim or a.ndim == 0:
        return None
    lead = b.ndim
    while lead and b.shape[lead - 1] == 1:
        lead -= 1
    if b.shape[:lead] != a.shape[:lead]:
        return None
    rows = int(np.prod(a.shape[:lead]))
    return a.reshape(rows, -1), b.reshape(rows, 1)


def conv_accumulator(
    x: np.ndarray, x_zp: int, weights: np.ndarray, g: ConvGeometry, chunk: int
) -> tuple[np.ndarray, tuple[int, int]]:
    """The exact accumulator of a convolution (N, M, OH * OW, maybe a strided view) without
    bias, and (OH, OW).

    `weights` are the codes less their zero points in float32: (M, C / group * kh * kw) for
    dense and grouped convolutions, (C, kh, kw) for depthwise ones. Products run through BLAS
    in float32 over at most `chunk` terms of K at a time, the most whose partial sums stay
    below 2^24 (exact, `integer.exact_dtype`); longer sums add those float32 products in
    float64 (exact below 2^53).
    """
    n, c, height, width = x.shape
    top, left, bottom, right = g.pads
    (kh, kw), (dh, dw), (sh, sw) = g.kernel, g.dilations, g.strides
    oh = (height + top + bottom - (kh - 1) * dh - 1) // sh + 1
    ow = (width + left + right - (kw - 1) * dw - 1) // sw + 1
    geometry = (kh, kw, sh, sw, dh, dw, top, left, oh, ow)
    if weights.ndim == 3:  # depthwise
        out = np.empty((n, c, oh, ow), np.float32)
        depthwise(x, np.int32(x_zp), weights, *geometry, out)
        return out.reshape(n, c, oh * ow), (oh, ow)
    # the operand as (K, N, P): one BLAS product over every image (small images would
    # otherwise spend their time in N tiny products); the result is read back as (N, M, P)
    if (kh, kw, sh, sw) == (1, 1, 1, 1) and not any(g.pads):
        columns = x.reshape(n, c, height * width).transpose(1, 0, 2) - np.float32(x_zp)
    else:
        columns = np.empty((c * kh * kw, n, oh * ow), np.float32)
        im2col(x, np.int32(x_zp), *geometry, columns.transpose(1, 0, 2))
    columns = columns.reshape(columns.shape[0], -1)
    m = weights.shape[0]
    mg, kg = m // g.group, weights.shape[1]
    parts = [
        _product(
            weights[group * mg : (group + 1) * mg], columns[group * kg : (group + 1) * kg], chunk
        )
        for group in range(g.group)
    ]
    product = parts[0] if g.group == 1 else np.concatenate(parts)
    return product.reshape(m, n, oh * ow).transpose(1, 0, 2), (oh, ow)


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
