"""Exact integer arithmetic for the engine: convolution and matrix products of integer tensors,
accumulator simulation, and the two requantizations (docs/quantization.md, §8).

Products of int8 (or int16) operands are summed in floating point through BLAS, which is exact
while every partial sum is an integer below the format's 2^24 (float32) or 2^53 (float64): the
bound `K * max|a| * max|b|` picks float32 when it fits (K up to ~500 for uint8 x int8), else
float64 (any real length). Orders of magnitude faster than NumPy's integer matmul.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from qdq.errors import ModelError
from qdq.fixedpoint import quantize_multiplier, requantize
from qdq.onnx.conv import ConvGeometry

EXACT_LIMIT = 2.0**53


def exact_dtype(a: np.ndarray, b: np.ndarray, length: int) -> type:
    """float32 if no partial sum of `length` products of a and b can reach 2^24, else float64."""
    largest = float(np.abs(a).max(initial=0)) * float(np.abs(b).max(initial=0)) * length
    if largest >= EXACT_LIMIT:
        raise ModelError(
            "its integer products can exceed 2^53, past what the engine sums exactly; "
            "the engine runs operands of at most 16 bits"
        )
    return np.float32 if largest < 2.0**24 else np.float64


def exact_matmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Integer matmul (broadcasting like numpy.matmul) as int64, exact through BLAS."""
    dtype = exact_dtype(a, b, a.shape[-1])
    return np.matmul(a.astype(dtype), b.astype(dtype)).astype(np.int64)


def _check_image(x: np.ndarray) -> None:
    if x.ndim != 4:
        raise ModelError(f"the integer engine convolves 2-D images (N, C, H, W), got {x.shape}")


def exact_conv(x: np.ndarray, w: np.ndarray, g: ConvGeometry) -> np.ndarray:
    """2-D convolution of integer tensors (zero points already removed), int64 out.

    x (N, C, H, W), w (M, C / group, kh, kw): padding adds real zeros, dilation and groups as
    ONNX Conv defines them; the sum runs in float64 (exact, see the module docstring).
    """
    _check_image(x)
    n, c, _, _ = x.shape
    m = w.shape[0]
    top, left, bottom, right = g.pads
    dtype = exact_dtype(x, w, int(np.prod(w.shape[1:])))
    padded = np.pad(x.astype(dtype), ((0, 0), (0, 0), (top, bottom), (left, right)))
    (kh, kw), (dh, dw), (sh, sw) = g.kernel, g.dilations, g.strides
    span = ((kh - 1) * dh + 1, (kw - 1) * dw + 1)
    windows = sliding_window_view(padded, span, axis=(2, 3))[:, :, ::sh, ::sw, ::dh, ::dw]
    oh, ow = windows.shape[2:4]
    cg, mg = c // g.group, m // g.group
    weights = w.astype(dtype)
    if cg == 1 and mg == 1:  # depthwise: a multiply-add per kernel tap, no matrix product
        out = np.zeros((n, c, oh, ow), dtype)
        for i in range(kh):
            for j in range(kw):
                out += windows[..., i, j] * weights[:, 0, i, j].reshape(1, c, 1, 1)
        return out.astype(np.int64)
    out = np.empty((n, m, oh, ow), dtype)
    for group in range(g.group):  # im2col, then one BLAS product per group
        patches = windows[:, group * cg : (group + 1) * cg]  # (N, Cg, OH, OW, kh, kw)
        columns = patches.transpose(0, 2, 3, 1, 4, 5).reshape(n * oh * ow, cg * kh * kw)
        kernel = weights[group * mg : (group + 1) * mg].reshape(mg, cg * kh * kw)
        product = (columns @ kernel.T).reshape(n, oh, ow, mg)
        out[:, group * mg : (group + 1) * mg] = product.transpose(0, 3, 1, 2)
    return out.astype(np.int64)


def exact_pool_sum(x: np.ndarray, g: ConvGeometry) -> np.ndarray:
    """Sum over each pooling window (zero padding), per channel: (N, C, OH, OW)."""
    top, left, bottom, right = g.pads
    padded = np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)))
    (kh, kw), (dh, dw), (sh, sw) = g.kernel, g.dilations, g.strides
    span = ((kh - 1) * dh + 1, (kw - 1) * dw + 1)
    windows = sliding_window_view(padded, span, axis=(2, 3))[:, :, ::sh, ::sw, ::dh, ::dw]
    return windows.sum(axis=(4, 5))


@dataclass
class Accumulator:
    """How wide the hardware's accumulator is; counts the sums that did not fit."""

    bits: int = 32
    overflows: int = 0
    total: int = 0

    def clamp(self, acc: np.ndarray) -> np.ndarray:
        """`acc` (the exact final sums) saturated to the accumulator's range, counting how many
        elements overflowed."""
        lo, hi = -(1 << (self.bits - 1)), (1 << (self.bits - 1)) - 1
        outside = int(((acc < lo) | (acc > hi)).sum())
        self.overflows += outside
        self.total += acc.size
        return np.clip(acc, lo, hi) if outside else acc

    def record(self, saturated: np.ndarray) -> None:
        """Count the sums of a saturating accumulation, `saturated` where any step clipped."""
        self.overflows += int(saturated.sum())
        self.total += saturated.size


INT16 = (-(1 << 15), (1 << 15) - 1)


def saturating_matmul16(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """a @ b (broadcasting like numpy.matmul) summed as an int16 datapath does: the products of
    each adjacent pair along K added and saturated to int16 (x86 `vpmaddubsw`), those pair sums
    then accumulated left to right with int16 saturation (`vpaddsw`). Returns the int64 result
    and where any step saturated.

    >>> a, b = np.array([[200, 200, -200, -200]]), np.full((4, 1), 150)
    >>> saturating_matmul16(a, b)[0]
    array([[-1]])

    (pairs: 30000 + 30000 saturates to 32767, -60000 to -32768; 32767 - 32768 = -1, not 0.)
    """
    a, b = a.astype(np.int64), b.astype(np.int64)
    lo, hi = INT16
    shape = (*np.broadcast_shapes(a.shape[:-2], b.shape[:-2]), a.shape[-2], b.shape[-1])
    acc = np.zeros(shape, np.int64)
    saturated = np.zeros(shape, bool)
    for k in range(0, a.shape[-1], 2):
        pair = a[..., :, k, None] * b[..., k, None, :]
        if k + 1 < a.shape[-1]:
            pair = pair + a[..., :, k + 1, None] * b[..., k + 1, None, :]
        acc = acc + np.clip(pair, lo, hi)
        saturated |= (pair < lo) | (pair > hi) | (acc < lo) | (acc > hi)
        acc = np.clip(acc, lo, hi)
    return acc, saturated


def saturating_conv16(
    x: np.ndarray, w: np.ndarray, g: ConvGeometry
) -> tuple[np.ndarray, np.ndarray]:
    """`exact_conv` through `saturating_matmul16`, K ordered as MLAS packs a filter (kernel
    tap major, input channel minor: a pair is two channels at one tap). (N, M, OH, OW) out."""
    _check_image(x)
    n, c, _, _ = x.shape
    m = w.shape[0]
    top, left, bottom, right = g.pads
    padded = np.pad(x.astype(np.int64), ((0, 0), (0, 0), (top, bottom), (left, right)))
    (kh, kw), (dh, dw), (sh, sw) = g.kernel, g.dilations, g.strides
    span = ((kh - 1) * dh + 1, (kw - 1) * dw + 1)
    windows = sliding_window_view(padded, span, axis=(2, 3))[:, :, ::sh, ::sw, ::dh, ::dw]
    oh, ow = windows.shape[2:4]
    cg, mg = c // g.group, m // g.group
    acc = np.empty((n, m, oh, ow), np.int64)
    saturated = np.empty((n, m, oh, ow), bool)
    for group in range(g.group):
        patches = windows[:, group * cg : (group + 1) * cg]  # (N, Cg, OH, OW, kh, kw)
        columns = patches.transpose(0, 2, 3, 4, 5, 1).reshape(n * oh * ow, kh * kw * cg)
        kernel = w[group * mg : (group + 1) * mg].transpose(2, 3, 1, 0).reshape(-1, mg)
        total, hit = saturating_matmul16(columns, kernel)
        rows = slice(group * mg, (group + 1) * mg)
        acc[:, rows] = total.reshape(n, oh, ow, mg).transpose(0, 3, 1, 2)
        saturated[:, rows] = hit.reshape(n, oh, ow, mg).transpose(0, 3, 1, 2)
    return acc, saturated


def requantize_output(
    acc: np.ndarray,
    multiplier: np.ndarray,
    zero_point: np.ndarray,
    dtype: np.dtype,
    mode: str,
    fixed: tuple[np.ndarray, np.ndarray] | None = None,
) -> np.ndarray:
    """int32 accumulator -> output codes of `dtype`.

    "float": ONNX Runtime's MLAS (`MlasRequantizeOutput`): float32(acc) * M in float32, clamped
    to [qmin - z, qmax - z], rounded half to even, plus z; "spec": the ONNX definition read
    literally, `round_half_even(acc * M) + z` in float64; "fixed": gemmlowp's integer multiply by
    `(m0, shift)` (eq. 12-16), given precomputed in `fixed` or derived from M.
    """
    info = np.iinfo(dtype)
    if mode == "float":
        return requantize_mlas(acc, np.asarray(multiplier, np.float32), zero_point, dtype)
    if mode == "spec":
        real = acc.astype(np.float64) * multiplier + zero_point.astype(np.float64)
        return np.clip(np.rint(real), info.min, info.max).astype(dtype)
    if mode != "fixed":
        raise ModelError(f"requant must be 'fixed', 'float' or 'spec', got {mode!r}")
    m0, shift = fixed or quantize_multiplier(np.asarray(multiplier, dtype=np.float64))
    acc32 = np.clip(acc, -(1 << 31), (1 << 31) - 1)
    return requantize(acc32, m0, shift, zero_point.astype(np.int64), info.min, info.max).astype(
        dtype
    )


def requantize_mlas(
    acc: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, dtype: np.dtype
) -> np.ndarray:
    """MLAS's requantization: `float32(acc) * scale` (one float32 product), clamped to the
    output range less the zero point, rounded half to even (`cvtps2dq`), plus the zero point.

    >>> requantize_mlas(np.array([5, 7]), np.float32(0.5), np.array(3, np.uint8), np.uint8)
    array([5, 7], dtype=uint8)

    (2.5 rounds to 2 and 3.5 to 4, half to even, then + 3.)
    """
    info = np.iinfo(dtype)
    zp = int(np.asarray(zero_point).reshape(-1)[0])  # ONNX Runtime's y_zero_point is scalar
    scaled = acc.astype(np.float32) * scale.astype(np.float32)
    clamped = np.clip(scaled, np.float32(info.min - zp), np.float32(info.max - zp))
    return (np.rint(clamped) + np.float32(zp)).astype(dtype)
