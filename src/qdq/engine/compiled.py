"""Compiled convolution kernels (Numba, the optional `fast` extra): the engine's fast path.

Same arithmetic as the NumPy reference in `integer.py` and `mlas.py`, in fewer passes. A dense
or grouped convolution runs a cache-sized tile of output positions at a time: im2col writes
the zero-point-free operand straight into float32, one BLAS product (exact while every partial
sum stays below 2^24, `integer.exact_dtype`), and ONNX Runtime's requantization
(`requantize_mlas`) with the bias, straight into the output codes. A depthwise convolution
lays each image out channels-last and sums tap by tap across channels (SIMD), requantizing
each output row as it is done. `tests/engine/test_fast_paths.py` checks the kernels against
the NumPy reference on real layer shapes, `tests/engine/test_compiled.py` on whole models.
"""

from __future__ import annotations

import numpy as np

from qdq.onnx.conv import ConvGeometry

try:
    from numba import njit, uint64
except ImportError:  # the NumPy path serves; `available()` says which
    njit = None
    uint64 = int

TILE = 1 << 18  # float32 values in a tile's columns and product together: 1 MiB, within L2


def available() -> bool:
    """Whether Numba is installed, so that `kernels="compiled"` can run."""
    return njit is not None


def _compile(function):
    if njit is None:
        return function
    return njit(cache=True, nogil=True, fastmath=False, error_model="numpy")(function)


def _padded_planes(x, x_zp, kh, kw, sh, sw, dh, dw, top, left, oh, ow):
    """x (N, C, H, W) less its zero point in float32, inside a zero border as wide as every
    window of the output reaches: what `_columns` copies from."""
    n_count, channels, height, width = x.shape
    rows = max(height + top, (oh - 1) * sh + (kh - 1) * dh + 1)
    columns = max(width + left, (ow - 1) * sw + (kw - 1) * dw + 1)
    padded = np.zeros((n_count, channels, rows, columns), np.float32)
    for n in range(n_count):
        for c in range(channels):
            for h in range(height):
                source, target = x[n, c, h], padded[n, c, h + top, left:]
                for v in range(width):
                    target[v] = np.float32(np.int32(source[v]) - x_zp)
    return padded


def _columns(padded, kh, kw, sh, sw, dh, dw, oh, ow, first, out):
    """im2col of output positions `first`, `first + 1`, ... (r = (n * oh + y) * ow + v, as many
    as `out` has columns) from `_padded_planes`: out[(c * kh + i) * kw + j, r - first] =
    padded[n, c, y * sh + i * dh, v * sw + j * dw]. Each row of `out` is written in order,
    one output row's run at a time."""
    _, channels, rows, width = padded.shape
    count = out.shape[1]
    flat = padded.ravel()
    for c in range(channels):
        for i in range(kh):
            for j in range(kw):
                target = out[(c * kh + i) * kw + j]
                n, rest = divmod(first, oh * ow)
                y, v0 = divmod(rest, ow)
                t = 0
                while t < count:
                    run = min(ow - v0, count - t)
                    # unsigned: no negative-index test per element
                    start = uint64(((n * channels + c) * rows + y * sh + i * dh) * width)
                    start += uint64(v0 * sw + j * dw)
                    for q in range(uint64(run)):
                        target[uint64(t) + q] = flat[start + q * uint64(sw)]
                    t += run
                    v0 = 0
                    y += 1
                    if y == oh:
                        y = 0
                        n += 1


def _pointwise_columns(x, x_zp, first, out):
    """`_columns` of a 1x1 kernel with unit strides and no padding, x as (N, C, H * W): runs
    of one image's positions, copied less the zero point."""
    plane = x.shape[2]
    count = out.shape[1]
    t = 0
    while t < count:
        n = (first + t) // plane
        p0 = first + t - n * plane
        run = min(plane - p0, count - t)
        for c in range(x.shape[1]):
            source, target = x[n, c, p0 : p0 + run], out[c, t : t + run]
            for q in range(run):
                target[q] = np.float32(np.int32(source[q]) - x_zp)
        t += run


def _requantize_columns(product, bias, scale, zero_point, low, high, first, out):
    """`_requantize_mlas` of a product over output positions `first`, ... (`_columns`) into
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


def _depthwise_ring(x, w, sw, dh, dw, left, ow):
    """The channels-last rows a depthwise convolution reads, as a ring of the kh * dilation
    rows one output row spans (rows, sw, span, C): column q * sw + phase of a padded row at
    [slot, phase, q], so that the taps of a strided convolution read contiguous runs too. A
    small ring stays in cache; a whole padded image would not."""
    width, channels = x.shape[3], x.shape[1]
    columns = max(width + left, (ow - 1) * sw + (w.shape[1] - 1) * dw + 1)
    rows = (w.shape[0] - 1) * dh + 1
    return np.zeros((rows, sw, (columns + sw - 1) // sw, channels), np.float32)


def _fill_row(x, x_zp, n, h, left, ring, slot):
    """Ring `slot` = row h of image n (N, C, H, W) less its zero point, channels-last, a
    pixel's channels at a time, zero columns around it; all zero where h is padding."""
    _, channels, height, width = x.shape
    _, sw, span, _ = ring.shape
    if h < 0 or h >= height:
        ring[slot] = 0.0
        return
    for column in range(sw * span):
        v = column - left
        pixel = ring[slot, column % sw, column // sw]
        if v < 0 or v >= width:
            pixel[:] = 0.0
            continue
        for c in range(channels):
            pixel[c] = np.float32(np.int32(x[n, c, h, v]) - x_zp)


def _output_row(x, x_zp, n, y, w, sh, dh, dw, top, left, ring, filled, acc):
    """acc (OW, C) = output row y of image n: the sum over taps (i, j) of padded row
    y * sh + i * dh, columns v * sw + j * dw, times w[i, j]; every tap one contiguous run over
    (v, c), vectorized across channels. Fills the ring's rows up to the last one it reads,
    from `filled` on; returns the next row to fill."""
    kh, kw, channels = w.shape
    rows, sw = ring.shape[0], ring.shape[1]
    while filled <= y * sh + (kh - 1) * dh:
        _fill_row(x, x_zp, n, filled - top, left, ring, filled % rows)
        filled += 1
    acc[:] = 0.0
    for i in range(kh):
        row = (y * sh + i * dh) % rows
        for j in range(kw):
            column = j * dw
            source = ring[row, column % sw, column // sw :]
            weights = w[i, j]
            for v in range(acc.shape[0]):
                total, values = acc[v], source[v]  # rows: no index arithmetic inside
                for c in range(channels):
                    total[c] += values[c] * weights[c]
    return filled


def _depthwise(x, x_zp, w, sh, sw, dh, dw, top, left, oh, ow, out):
    """out[n, c, y, v] = the sum over taps of (x - x_zp) * w[:, :, c] (w as (kh, kw, C)), in
    float32: exact, the caller bounds every partial sum below 2^24. The rows are laid out
    channels-last as the output reaches them, so that every tap is one vector product across
    channels."""
    ring = _depthwise_ring(x, w, sw, dh, dw, left, ow)
    acc = np.empty((ow, x.shape[1]), np.float32)
    for n in range(x.shape[0]):
        filled = 0
        for y in range(oh):
            filled = _output_row(x, x_zp, n, y, w, sh, dh, dw, top, left, ring, filled, acc)
            for c in range(acc.shape[1]):
                for v in range(ow):
                    out[n, c, y, v] = acc[v, c]


def _depthwise_requantized(
    x, x_zp, w, sh, sw, dh, dw, top, left, oh, ow, bias, scale, zero_point, low, high, out
):
    """`_depthwise` with `_requantize_mlas` fused: each output row's sums become codes."""
    ring = _depthwise_ring(x, w, sw, dh, dw, left, ow)
    acc = np.empty((ow, x.shape[1]), np.float32)
    for n in range(x.shape[0]):
        filled = 0
        for y in range(oh):
            filled = _output_row(x, x_zp, n, y, w, sh, dh, dw, top, left, ring, filled, acc)
            for v in range(ow):  # requantized in place, vectorized across channels
                values = acc[v]
                for c in range(values.size):
                    value = np.float32(np.int32(values[c]) + bias[c]) * scale[c]
                    values[c] = np.rint(min(max(value, low), high))
            for c in range(acc.shape[1]):
                for v in range(ow):
                    out[n, c, y, v] = np.int32(acc[v, c]) + zero_point


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
            value = np.float32(np.float64(a[i, j]) * r_a + np.float64(inner))
            if -2147483648.0 < value < 2147483648.0:  # `mlas.convert_and_pack`
                out[i, j] = min(max(np.rint(value), low), high)
            else:
                out[i, j] = low


def _mul_spans(a, a_zp, b, b_zp, ratio, c_zp, low, high, out):
    """`mlas.qlinear_mul` on (R, S) codes, b (R, S) or one value per row (R, 1): float32
    `product * ratio + c_zp`, then `mlas.convert_and_pack` (beyond int32: the minimum)."""
    rows, size = a.shape
    per_row = b.shape[1] == 1
    for i in range(rows):
        for j in range(size):
            code = b[i, 0] if per_row else b[i, j]
            product = (np.int32(a[i, j]) - a_zp) * (np.int32(code) - b_zp)
            value = np.float32(product) * ratio + c_zp
            if -2147483648.0 < value < 2147483648.0:
                out[i, j] = min(max(np.rint(value), low), high)
            else:
                out[i, j] = low


padded_planes = _compile(_padded_planes)
columns = _compile(_columns)
pointwise_columns = _compile(_pointwise_columns)
requantize_columns = _compile(_requantize_columns)
_depthwise_ring = _compile(_depthwise_ring)
_fill_row = _compile(_fill_row)
_output_row = _compile(_output_row)
depthwise = _compile(_depthwise)
depthwise_requantized = _compile(_depthwise_requantized)
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
    x: np.ndarray,
    x_zp: int,
    weights: np.ndarray,
    g: ConvGeometry,
    chunk: int,
    requantize: tuple | None = None,
) -> tuple[np.ndarray, tuple[int, int]]:
    """The exact accumulator of a convolution (N, M, OH * OW, maybe a strided view) without
    bias, and (OH, OW); given `requantize` = (int32 bias, float32 scale, zero point, low, high,
    dtype) per output channel, the output codes of `_requantize_mlas` instead, fused.

    `weights` are the codes less their zero points in float32: (M, C / group * kh * kw) for
    dense and grouped convolutions, (kh, kw, C) for depthwise ones. Products run through BLAS
    in float32 over at most `chunk` terms of K at a time, the most whose partial sums stay
    below 2^24 (exact, `integer.exact_dtype`); longer sums add those float32 products in
    float64 (exact below 2^53).
    """
    n, c, height, width = x.shape
    top, left, bottom, right = g.pads
    (kh, kw), (dh, dw), (sh, sw) = g.kernel, g.dilations, g.strides
    oh = (height + top + bottom - (kh - 1) * dh - 1) // sh + 1
    ow = (width + left + right - (kw - 1) * dw - 1) // sw + 1
    zp = np.int32(x_zp)
    if weights.ndim == 3:  # depthwise
        taps = (sh, sw, dh, dw, top, left, oh, ow)
        if requantize is None:
            out = np.empty((n, c, oh, ow), np.float32)
            depthwise(x, zp, weights, *taps, out)
        else:
            bias, scale, y_zp, low, high, dtype = requantize
            out = np.empty((n, c, oh, ow), dtype)
            codes = (bias, scale, np.int32(y_zp), low, high)
            depthwise_requantized(x, zp, weights, *taps, *codes, out)
        return out.reshape(n, c, oh * ow), (oh, ow)
    geometry = (kh, kw, sh, sw, dh, dw, top, left, oh, ow)
    m, k = weights.shape[0], c * kh * kw
    if requantize is not None and chunk >= weights.shape[1]:
        return _fused_conv(x, zp, weights, g.group, geometry, requantize), (oh, ow)
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
    acc = product.reshape(m, n, oh * ow).transpose(1, 0, 2)
    if requantize is None:
        return acc, (oh, ow)
    bias, scale, y_zp, low, high, dtype = requantize
    out = np.empty(acc.shape, dtype)
    requantize_fused(acc, bias, scale, np.int32(y_zp), low, high, out)
    return out, (oh, ow)


def _taps(geometry: tuple) -> tuple:
    """`_columns`'s geometry from `conv_accumulator`'s (the padding is already applied)."""
    kh, kw, sh, sw, dh, dw, _, _, oh, ow = geometry
    return kh, kw, sh, sw, dh, dw, oh, ow


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
    width = min(total, max(256, TILE // (k + m)))
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
