"""Compiled depthwise convolution and integer MaxPool on pixels (Numba): each reads x as
(N, H, W, C), a view of either memory layout, and writes (N, H, W, C) memory, vectorized
across channels. Same arithmetic as the NumPy reference (`integer.py`, `mlas.py`).
"""

from __future__ import annotations

import numpy as np

from qdq.engine.jit import compile_kernel


def _depthwise_ring(x, w, sw, dh, dw, left, ow):
    """The channels-last rows a depthwise convolution reads (x as pixels, N, H, W, C), as a
    ring of the kh * dilation rows one output row spans (rows, sw, span, C): column
    q * sw + phase of a padded row at [slot, phase, q], so that the taps of a strided
    convolution read contiguous runs too. A small ring stays in cache; a whole padded image
    would not."""
    width, channels = x.shape[2], x.shape[3]
    columns = max(width + left, (ow - 1) * sw + (w.shape[1] - 1) * dw + 1)
    rows = (w.shape[0] - 1) * dh + 1
    return np.zeros((rows, sw, (columns + sw - 1) // sw, channels), np.float32)


def _fill_row(x, x_zp, n, h, left, ring, slot):
    """Ring `slot` = row h of image n less its zero point, x as pixels (N, H, W, C: a view of
    either layout), zero columns around it; all zero where h is padding."""
    _, height, width, channels = x.shape
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
        source = x[n, h, v]
        for c in range(channels):
            pixel[c] = np.float32(np.int32(source[c]) - x_zp)


def _output_row(x, x_zp, n, y, w, sh, dh, dw, top, left, ring, filled, acc):
    """acc (OW, C) = output row y of image n (x as pixels, N, H, W, C): the sum over taps
    (i, j) of padded row y * sh + i * dh, columns v * sw + j * dw, times w[i, j]; every tap
    one contiguous run over (v, c), vectorized across channels. Fills the ring's rows up to
    the last one it reads, from `filled` on; returns the next row to fill."""
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
    """out[n, y, v, c] = the sum over taps of (x - x_zp) * w[:, :, c] (x and out as pixels,
    N, H, W, C; w as (kh, kw, C)), in float32: exact, the caller bounds every partial sum
    below 2^24. The rows are laid out channels-last as the output reaches them, so that every
    tap is one vector product across channels."""
    ring = _depthwise_ring(x, w, sw, dh, dw, left, ow)
    acc = np.empty((ow, x.shape[3]), np.float32)
    for n in range(x.shape[0]):
        filled = 0
        for y in range(oh):
            filled = _output_row(x, x_zp, n, y, w, sh, dh, dw, top, left, ring, filled, acc)
            out[n, y] = acc


def _depthwise_requantized(
    x, x_zp, w, sh, sw, dh, dw, top, left, oh, ow, bias, scale, zero_point, low, high, out
):
    """`_depthwise` with `_requantize_mlas` fused: each output row's sums become codes."""
    ring = _depthwise_ring(x, w, sw, dh, dw, left, ow)
    acc = np.empty((ow, x.shape[3]), np.float32)
    for n in range(x.shape[0]):
        filled = 0
        for y in range(oh):
            filled = _output_row(x, x_zp, n, y, w, sh, dh, dw, top, left, ring, filled, acc)
            for v in range(ow):  # vectorized across channels
                values, target = acc[v], out[n, y, v]
                for c in range(values.size):
                    value = np.float32(np.int32(values[c]) + bias[c]) * scale[c]
                    target[c] = np.int32(np.rint(min(max(value, low), high))) + zero_point


def _max_pool(x, kh, kw, sh, sw, dh, dw, top, left, lowest, out):
    """out[n, y, v, c] = the largest code of x (as pixels, N, H, W, C) in the window, padding
    left out, vectorized across channels; out as pixels too."""
    _, height, width, _ = x.shape
    for n in range(out.shape[0]):
        for y in range(out.shape[1]):
            for v in range(out.shape[2]):
                target = out[n, y, v]
                target[:] = lowest
                for i in range(kh):
                    h = y * sh + i * dh - top
                    if 0 <= h < height:
                        for j in range(kw):
                            column = v * sw + j * dw - left
                            if 0 <= column < width:
                                source = x[n, h, column]
                                for c in range(target.size):
                                    target[c] = max(target[c], source[c])


_depthwise_ring = compile_kernel(_depthwise_ring)
_fill_row = compile_kernel(_fill_row)
_output_row = compile_kernel(_output_row)
depthwise = compile_kernel(_depthwise)
depthwise_requantized = compile_kernel(_depthwise_requantized)
max_pool_pixels = compile_kernel(_max_pool)
