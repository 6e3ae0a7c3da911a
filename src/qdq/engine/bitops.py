"""Low-bit kernels: the arithmetic binary, ternary and power-of-two weights allow, exact against
the int8 multiply-accumulate on the same codes (docs/engine.md, "Low-bit kernels", eq. L1-L5).

Every kernel here computes one integer accumulator per (row of x, row of w),

    acc[p, m] = sum_k w[m, k] * (x[p, k] - x_zero_point)                              (L1)

with the operations the weights allow: XNOR and popcount for {-1, +1} weights (L2, L3),
shifts and adds for {0, +-2^e} (L4; ternary {-1, 0, +1} is e = 0: adds only), and the zero
point as a per-channel constant (L5). The weight codes are `qdq.lowbit.grid_codes`'s. These
kernels show the arithmetic and count it (`op_counts`); they are not the engine's fast path.

>>> x = np.array([[3, 0, 5]], np.uint8)
>>> w = np.array([[1, -1, 1], [-1, -1, 1]], np.int8)
>>> int8_matmul(x, w, 1).tolist(), bitplane_matmul(x, w, 1).tolist()
([[7, 3]], [[7, 3]])
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from qdq.errors import DataError
from qdq.lowbit import WeightGrid
from qdq.onnx.conv import ConvGeometry

# Largest intermediate a kernel builds at once (elements); rows of x are taken in chunks so a
# whole layer's (rows, M, K) broadcast never sits in memory.
CHUNK_ELEMENTS = 1 << 22
# Bits set in each byte value: NumPy 1.26 has no popcount, so bytes are counted by table.
POPCOUNT = np.array([bin(byte).count("1") for byte in range(256)], dtype=np.int64)
MAX_ACTIVATION_BITS = 16


class Kernel(enum.StrEnum):
    """How a kernel forms each product w * x."""

    INT8 = "int8"  # multiply-accumulate, any integer codes (the reference, L1)
    XNOR = "xnor"  # {-1, +1} activations and weights: XNOR and popcount (L2)
    BITPLANE = "bitplane"  # integer activations, {-1, +1} weights: AND-popcount per bit (L3)
    SHIFT_ADD = "shift_add"  # weights 0 or +-2^e: shifts and adds; ternary is e = 0 (L4)


def int8_matmul(x: np.ndarray, w: np.ndarray, x_zero_point: int = 0) -> np.ndarray:
    """(P, K) activation codes times (M, K) weight codes -> (P, M) int64 (eq. L1): K multiplies
    and K adds per output, summed in int64 so no length overflows.

    >>> int8_matmul(np.array([[130, 128]], np.uint8), np.array([[2, -3]], np.int8), 128).tolist()
    [[4]]
    """
    x, w = _operands(x, w)
    return (x.astype(np.int64) - x_zero_point) @ w.astype(np.int64).T


def xnor_matmul(x: np.ndarray, w: np.ndarray, x_zero_point: int = 0) -> np.ndarray:
    """{-1, +1} activations times {-1, +1} weights, XNOR-Net's kernel (eq. L2): with bit 1 for
    +1, a product is +1 where the bits agree, so sum_k x_k w_k = K - 2 popcount(x XOR w).

    x = [1, -1, -1], w = [1, 1, -1]: bits 100 and 110 differ in one place -> 3 - 2 = 1.

    >>> xnor_matmul(np.array([[1, -1, -1]]), np.array([[1, 1, -1]])).tolist()
    [[1]]
    """
    x, w = _operands(x, w)
    _check_signs(x, "activation")
    _check_signs(w, "weight")
    if x_zero_point != 0:
        raise DataError(
            f"{{-1, +1}} activations have no zero point, got {x_zero_point}; pass 0, or use "
            "bitplane_matmul for integer activations"
        )
    x_bits, w_bits = np.packbits(x > 0, axis=1), np.packbits(w > 0, axis=1)
    out = np.empty((x.shape[0], w.shape[0]), np.int64)
    for rows in _row_chunks(x.shape[0], w_bits.size):
        # XOR, not XNOR: the pad bits of the last byte are 0 in both and must not count (L2).
        differ = POPCOUNT[x_bits[rows, None, :] ^ w_bits[None]].sum(axis=2)
        out[rows] = x.shape[1] - (differ << 1)
    return out


def bitplane_matmul(x: np.ndarray, w: np.ndarray, x_zero_point: int = 0) -> np.ndarray:
    """Integer activation codes (up to 16 bits) times {-1, +1} weights by bit planes (eq. L3):
    bit plane b of the activations AND the weights' sign bits, popcounted, shifted by b + 1;
    minus sum_k x_k; minus the zero point's constant (L5). A signed code's top plane weighs
    -2^(bits-1) (two's complement), so it is subtracted.

    x = [3, 0, 5] (planes: b0 = 101, b1 = 100, b2 = 001), w = [1, -1, 1] (bits 101):
    2 * (1 * 2 + 2 * 1 + 4 * 1) - (3 + 0 + 5) = 16 - 8 = 8 = 3 - 0 + 5.

    >>> bitplane_matmul(np.array([[3, 0, 5]], np.uint8), np.array([[1, -1, 1]], np.int8)).tolist()
    [[8]]
    """
    x, w = _operands(x, w)
    _check_signs(w, "weight")
    bits = x.dtype.itemsize * 8
    if bits > MAX_ACTIVATION_BITS:
        raise DataError(f"bit planes of activations up to 16 bits, got {x.dtype}; cast the codes")
    unsigned = x.view(np.dtype(f"u{x.dtype.itemsize}"))  # the two's complement bits
    shifts = np.arange(bits, dtype=unsigned.dtype).reshape(bits, 1, 1)
    planes = np.packbits((unsigned[None] >> shifts) & 1, axis=2)  # (bits, P, K / 8)
    w_bits = np.packbits(w > 0, axis=1)
    signed_top = x.dtype.kind == "i"
    row_sums = x.sum(axis=1, dtype=np.int64)  # one per patch, shared by all M outputs
    out = np.empty((x.shape[0], w.shape[0]), np.int64)
    for rows in _row_chunks(x.shape[0], bits * w_bits.size):
        counts = POPCOUNT[planes[:, rows, None, :] & w_bits[None, None]].sum(axis=3)
        acc = np.zeros(counts.shape[1:], np.int64)
        for b in range(bits):
            term = counts[b] << (b + 1)  # 2 * 2^b * popcount (L3)
            acc += -term if signed_top and b == bits - 1 else term
        out[rows] = acc - row_sums[rows, None]
    return out - x_zero_point * _weight_sums(w)


def shift_add_matmul(x: np.ndarray, w: np.ndarray, x_zero_point: int = 0) -> np.ndarray:
    """Integer activation codes times weights in {0, +-2^e} by shifts and adds (eq. L4): for
    each exponent e in a row, add the activations whose weight is +2^e, subtract those whose
    weight is -2^e, shift that partial sum left by e once; zero weights cost nothing. Ternary
    weights {-1, 0, +1} are the case e = 0: adds and subtracts only.

    x = [3, 1, 5], w = [4, 0, -1]: (3 << 2) - 5 = 7.

    >>> shift_add_matmul(np.array([[3, 1, 5]], np.uint8), np.array([[4, 0, -1]], np.int8)).tolist()
    [[7]]
    """
    x, w = _operands(x, w)
    exponents = _exponents(w)
    wide = x.astype(np.int64)
    out = np.zeros((x.shape[0], w.shape[0]), np.int64)
    for e in np.unique(exponents[exponents >= 0]):
        plus, minus = (w > 0) & (exponents == e), (w < 0) & (exponents == e)
        for rows in _row_chunks(x.shape[0], w.size):
            taken = wide[rows, None, :]
            partial = np.where(plus, taken, 0).sum(axis=2) - np.where(minus, taken, 0).sum(axis=2)
            out[rows] += partial << int(e)
    return out - x_zero_point * _weight_sums(w)


KERNELS: dict[Kernel, Callable[[np.ndarray, np.ndarray, int], np.ndarray]] = {
    Kernel.INT8: int8_matmul,
    Kernel.XNOR: xnor_matmul,
    Kernel.BITPLANE: bitplane_matmul,
    Kernel.SHIFT_ADD: shift_add_matmul,
}
# The kernel each weight grid's codes (qdq.lowbit.grid_codes) run on with integer activations.
GRID_KERNELS: dict[WeightGrid, Kernel] = {
    WeightGrid.UNIFORM: Kernel.INT8,
    WeightGrid.BINARY: Kernel.BITPLANE,
    WeightGrid.TERNARY: Kernel.SHIFT_ADD,
    WeightGrid.POWER_OF_TWO: Kernel.SHIFT_ADD,
}


def conv(
    x: np.ndarray, w: np.ndarray, geometry: ConvGeometry, kernel: Kernel, x_zero_point: int = 0
) -> np.ndarray:
    """2-D convolution of activation codes x (N, C, H, W) with weight codes w (M, C / group,
    kh, kw) -> int64 accumulators (N, M, OH, OW), as ONNX ConvInteger defines them: im2col,
    then `kernel`'s matmul per group. Padding holds the zero point (the real 0), so that the
    zero point's constant (L5) stays right at the borders.

    >>> g = ConvGeometry((1, 1), (1, 1), (1, 1), (0, 0, 0, 0), 1)
    >>> x = np.array([[[[3]], [[5]]]], np.uint8)
    >>> conv(x, np.array([[[[2]], [[-1]]]], np.int8), g, Kernel.SHIFT_ADD).tolist()
    [[[[1]]]]
    """
    x, w = np.asarray(x), np.asarray(w)
    if x.ndim != 4 or w.ndim != 4 or x.shape[1] != w.shape[1] * geometry.group:
        raise DataError(
            f"conv takes x (N, C, H, W) and w (M, C / group, kh, kw) with group "
            f"{geometry.group}, got {x.shape} and {w.shape}"
        )
    if kernel is Kernel.XNOR and any(geometry.pads):
        raise DataError(
            "{-1, +1} activations have no code for the zero that padding adds; pad x with -1 "
            "or +1 yourself and pass pads (0, 0, 0, 0)"
        )
    patches = _patches(x, geometry, x_zero_point)  # (N, OH, OW, C, kh, kw)
    n, oh, ow = patches.shape[:3]
    cg, mg = w.shape[1], w.shape[0] // geometry.group
    out = np.empty((n * oh * ow, w.shape[0]), np.int64)
    for group in range(geometry.group):
        columns = patches[:, :, :, group * cg : (group + 1) * cg].reshape(n * oh * ow, -1)
        weights = w[group * mg : (group + 1) * mg].reshape(mg, -1)
        out[:, group * mg : (group + 1) * mg] = KERNELS[kernel](columns, weights, x_zero_point)
    return out.reshape(n, oh, ow, w.shape[0]).transpose(0, 3, 1, 2)


@dataclass(frozen=True)
class OpCounts:
    """Operations per output accumulator, work shared by the M outputs of one patch divided
    among them. Every value summed into a running total is one add; the accumulator starts at
    the bias, which holds the zero point's constant (L5); bitwise is AND, XOR or XNOR on a
    word; packing bits is wiring on an FPGA and not counted."""

    multiplies: float
    adds: float
    shifts: float
    popcounts: float
    bitwise: float


def op_counts(
    kernel: Kernel,
    w: np.ndarray,
    activation_bits: int = 8,
    word_bits: int = 64,
    group: int = 1,
) -> OpCounts:
    """Mean operations per output of `kernel` on weight codes w (M, K), activations of
    `activation_bits`, `word_bits`-bit words for popcount, and each patch read by the M / group
    outputs of its group (1 in a depthwise conv) (docs/engine.md's table).

    K = 100, M = 4, 8-bit activations, 64-bit words (2 per row): int8 100 multiplies and 100
    adds; bit planes 8 x 2 ANDs and popcounts, 16 + 8 + 1 + 100 / 4 = 50 adds, 8 shifts.

    >>> w = np.ones((4, 100), np.int8)
    >>> op_counts(Kernel.INT8, w)
    OpCounts(multiplies=100.0, adds=100.0, shifts=0.0, popcounts=0.0, bitwise=0.0)
    >>> op_counts(Kernel.BITPLANE, w)
    OpCounts(multiplies=0.0, adds=50.0, shifts=8.0, popcounts=16.0, bitwise=16.0)
    """
    w = np.asarray(w)
    if w.ndim != 2 or w.size == 0 or group < 1 or w.shape[0] % group:
        raise DataError(
            f"op_counts takes weight codes (M, K) with M a multiple of group {group}, got "
            f"shape {w.shape}"
        )
    m, k = w.shape[0] // group, w.shape[1]  # m: outputs that share one patch
    words = -(-k // word_bits)
    if kernel is Kernel.INT8:
        return OpCounts(float(k), float(k), 0.0, 0.0, 0.0)
    if kernel is Kernel.XNOR:  # XOR, popcount and sum each word; K - 2 c: one shift, one add
        return OpCounts(0.0, float(words + 1), 1.0, float(words), float(words))
    if kernel is Kernel.BITPLANE:  # per plane: AND, popcount, sum per word; shift and add it;
        planes = activation_bits * words  # then minus the patch's sum, shared by M outputs
        adds = planes + activation_bits + 1 + k / m
        return OpCounts(0.0, float(adds), float(activation_bits), float(planes), float(planes))
    exponents = _exponents(w)  # shift-add: one add per nonzero weight, one shift and add
    shifted = [np.unique(row[row > 0]).size for row in exponents]  # per exponent > 0 in a row
    nonzero = float((exponents >= 0).sum(axis=1).mean())
    return OpCounts(0.0, nonzero + float(np.mean(shifted)), float(np.mean(shifted)), 0.0, 0.0)


def _operands(x: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """x (P, K) and w (M, K) as integer arrays of matching K, x contiguous."""
    x, w = np.asarray(x), np.asarray(w)
    if x.dtype.kind not in "iu" or w.dtype.kind not in "iu":
        raise DataError(
            f"low-bit kernels take integer codes, got {x.dtype} activations and {w.dtype} "
            "weights; quantize first (qdq.affine.quantize, qdq.lowbit.grid_codes)"
        )
    if x.ndim != 2 or w.ndim != 2 or x.shape[1] != w.shape[1]:
        raise DataError(f"matmul takes x (P, K) and w (M, K), got {x.shape} and {w.shape}")
    return np.ascontiguousarray(x), w


def _check_signs(codes: np.ndarray, what: str) -> None:
    if not np.isin(codes, (-1, 1)).all():
        raise DataError(
            f"this kernel takes {what} codes in {{-1, +1}}, got values {np.unique(codes)[:8]}; "
            "binarize with qdq.lowbit.grid_codes(..., WeightGrid.BINARY, ...)"
        )


def _exponents(w: np.ndarray) -> np.ndarray:
    """log2|w| per weight code, -1 where w = 0; refuses a code that is not 0 or +-2^e."""
    magnitude = np.abs(w.astype(np.int64))
    if ((magnitude & (magnitude - 1)) != 0).any():
        bad = np.unique(w[(magnitude & (magnitude - 1)) != 0])[:8]
        raise DataError(
            f"shift-add takes weight codes 0 or +-2^e, got {bad}; use "
            "qdq.lowbit.grid_codes with WeightGrid.TERNARY or POWER_OF_TWO"
        )
    safe = np.maximum(magnitude, 1)
    return np.where(magnitude > 0, np.log2(safe).astype(np.int64), -1)


def _weight_sums(w: np.ndarray) -> np.ndarray:
    """sum_k w[m, k] per output channel: the zero point's constant is -z times it (L5),
    computed once per layer, offline."""
    return w.astype(np.int64).sum(axis=1)


def _row_chunks(rows: int, per_row: int) -> Iterator[slice]:
    step = max(1, CHUNK_ELEMENTS // max(per_row, 1))
    return (slice(start, start + step) for start in range(0, rows, step))


def _patches(x: np.ndarray, g: ConvGeometry, x_zero_point: int) -> np.ndarray:
    """im2col: every kernel window of x padded with the zero point, (N, OH, OW, C, kh, kw)."""
    top, left, bottom, right = g.pads
    padded = np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)), constant_values=x_zero_point)
    (kh, kw), (dh, dw), (sh, sw) = g.kernel, g.dilations, g.strides
    span = ((kh - 1) * dh + 1, (kw - 1) * dw + 1)
    windows = np.lib.stride_tricks.sliding_window_view(padded, span, axis=(2, 3))
    return windows[:, :, ::sh, ::sw, ::dh, ::dw].transpose(0, 2, 3, 1, 4, 5)


__all__ = [
    "GRID_KERNELS",
    "KERNELS",
    "Kernel",
    "OpCounts",
    "bitplane_matmul",
    "conv",
    "int8_matmul",
    "op_counts",
    "shift_add_matmul",
    "xnor_matmul",
]
