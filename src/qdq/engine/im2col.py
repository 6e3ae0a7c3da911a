"""im2col for the compiled convolutions (Numba): a convolution's terms copied out as one column
(`columns`, `pointwise_columns`, from planes) or one row (`pixel_columns`, `pixel_rows`, from
channels-last pixels) per output position, ready for one product with the weights. Apart from
`compiled.py`, which tiles the positions, multiplies and requantizes.
"""

from __future__ import annotations

import numpy as np

from qdq.engine.jit import compile_kernel

try:
    from numba import uint64
except ImportError:  # the NumPy path serves; `available()` says which
    uint64 = int


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


def _pixels(x, shift, top, left, out):
    """out (N, rows, columns, C), its border already filled = x as pixels (N, H, W, C: a view
    of either layout) plus `shift` (less the zero point for float32 terms, the offset to
    unsigned for codes), inside that border: what `_pixel_columns` copies from."""
    n_count, height, width, channels = x.shape
    for n in range(n_count):
        for h in range(height):
            for v in range(width):
                source, target = x[n, h, v], out[n, h + top, v + left]
                for c in range(channels):
                    target[c] = np.int32(source[c]) + shift


def _pixel_columns(padded, kh, kw, sh, sw, dh, dw, oh, ow, first, out):
    """im2col of output positions `first`, ... (r = (n * oh + y) * ow + v, as many as `out`
    has rows) from `_pixels`, a row per position: out[r - first, (i * kw + j) * C + c] =
    padded[n, y * sh + i * dh, v * sw + j * dw, c]. A window's row of taps is one run of
    kw * C values when dw is 1."""
    _, rows, width, channels = padded.shape
    count, length = out.shape
    flat, target = padded.ravel(), out.ravel()
    run = uint64(kw * channels if dw == 1 else channels)
    for t in range(count):
        n, rest = divmod(first + t, oh * ow)
        y, v = divmod(rest, ow)
        for i in range(kh):
            line = ((n * rows + y * sh + i * dh) * width + v * sw) * channels
            for j in range(1 if dw == 1 else kw):
                # unsigned: no negative-index test per element
                start = uint64(line + j * dw * channels)
                base = uint64(t * length + (i * kw + j) * channels)
                for q in range(run):
                    target[base + q] = flat[start + q]


def _pixel_rows(x, shift, first, out):
    """`_pixel_columns` of a 1x1 kernel with unit strides and no padding: positions `first`,
    ... of x as pixels (N, H, W, C), a row each, plus `shift` (`_pixels`)."""
    _, height, width, channels = x.shape
    for t in range(out.shape[0]):
        n, rest = divmod(first + t, height * width)
        source, target = x[n, rest // width, rest % width], out[t]
        for c in range(channels):
            target[c] = np.int32(source[c]) + shift


padded_planes = compile_kernel(_padded_planes)
pixels = compile_kernel(_pixels)
pixel_columns = compile_kernel(_pixel_columns)
pixel_rows = compile_kernel(_pixel_rows)
columns = compile_kernel(_columns)
pointwise_columns = compile_kernel(_pointwise_columns)
