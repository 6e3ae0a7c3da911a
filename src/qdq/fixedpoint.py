"""Integer-only requantization, gemmlowp / TFLite semantics (docs/quantization.md, §8, eq. 12-16).

An int32 accumulator times a real multiplier `M = s_x s_w / s_y` is computed with integers only:
`M = m0 * 2^(shift - 31)`, `m0` an int32 in [2^30, 2^31) (eq. 13). All functions are vectorized
over NumPy int64 arrays that hold int32 values, and each one is exact (no float in the path).
"""

from __future__ import annotations

import enum

import numpy as np

from qdq.errors import DataError

INT32_MIN = -(1 << 31)
INT32_MAX = (1 << 31) - 1


class RequantRounding(enum.Enum):
    """Which of TFLite's two integer requantizations to run; they differ by at most 1 LSB."""

    DOUBLE = "double"  # gemmlowp and TFLite's default: SRDHM (round) then rounding shift (round)
    SINGLE = "single"  # TFLITE_SINGLE_ROUNDING: one 64-bit product, one rounding (half up)


def quantize_multiplier(real: float | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`(m0, shift)` with `real ~= m0 * 2^(shift - 31)`, `m0` in [2^30, 2^31) (eq. 13).

    Worked example: 0.75 = 0.75 * 2^0, m0 = round(0.75 * 2^31) = 1610612736, shift = 0.

    >>> quantize_multiplier(0.75)
    (array(1610612736), array(0))
    """
    real = np.asarray(real)
    if real.dtype.kind not in "biuf":
        raise DataError(f"a requantization multiplier must be a real number, got {real!r:.80}")
    real = real.astype(np.float64)
    if not np.isfinite(real).all() or (real < 0).any():
        raise DataError(f"a requantization multiplier must be finite and >= 0, got {real}")
    mantissa, shift = np.frexp(real)  # mantissa in [0.5, 1), or 0 for real == 0
    m0 = np.floor(mantissa * 2.0**31 + 0.5).astype(np.int64)  # exact: mantissa * 2^31 < 2^53
    carry = m0 == (1 << 31)  # the mantissa rounded up to 1.0: halve, one more power of two
    m0 = np.where(carry, m0 >> 1, m0)
    shift = np.where(carry, shift + 1, shift).astype(np.int64)
    underflow = shift < -31  # every bit would shift out: represent as exactly zero
    return np.where(underflow, 0, m0), np.where(underflow, 0, shift)


def saturating_rounding_doubling_high_mul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """High 32 bits of `2ab`, rounded half away from zero; INT32_MIN^2 saturates (eq. 14)."""
    a = np.asarray(a, dtype=np.int64)
    b = np.asarray(b, dtype=np.int64)
    ab = a * b  # |ab| <= 2^62: exact in int64
    low = (1 << 31) - 1
    total = ab + (1 << 30) - (ab < 0) * low  # nudge: 2^30, or 1 - 2^30 for negative products
    high = (total + (total < 0) * low) >> 31  # divide by 2^31, truncating toward zero
    if (b == INT32_MIN).any() if b.size < a.size else (a == INT32_MIN).any():
        high = np.where((a == INT32_MIN) & (b == INT32_MIN), INT32_MAX, high)
    return high


def rounding_divide_by_pot(x: np.ndarray, exponent: np.ndarray) -> np.ndarray:
    """`x / 2^exponent` rounded half away from zero, exponent in [0, 31] (eq. 15).

    >>> rounding_divide_by_pot(np.array([5, -5, 6, -6]), 1)  # 2.5, -2.5, 3, -3
    array([ 3, -3,  3, -3])
    """
    x = np.asarray(x, dtype=np.int64)
    exponent = np.asarray(exponent, dtype=np.int64)
    mask = (np.int64(1) << exponent) - 1
    remainder = x & mask
    threshold = (mask >> 1) + (x < 0)
    return (x >> exponent) + (remainder > threshold)


def multiply_by_quantized_multiplier(
    x: np.ndarray,
    m0: np.ndarray,
    shift: np.ndarray,
    rounding: RequantRounding = RequantRounding.DOUBLE,
) -> np.ndarray:
    """`x * m0 * 2^(shift - 31)` in integers, saturated to int32 (eq. 16)."""
    x = np.asarray(x, dtype=np.int64)
    m0 = np.asarray(m0, dtype=np.int64)
    shift = np.asarray(shift, dtype=np.int64)
    if rounding is RequantRounding.SINGLE:
        total_shift = 31 - np.clip(shift, -31, 30)  # TFLite's single rounding covers shift <= 30
        nudge = np.int64(1) << (total_shift - 1)
        return np.clip((x * m0 + nudge) >> total_shift, INT32_MIN, INT32_MAX)
    # Past 32, every accumulator but 0 saturates anyway; a shift of 64 or more is undefined in
    # int64 (a dead ReLU's floor scale made multipliers of 2^31 and more, shift 33 and up).
    left = np.clip(shift, 0, 32)
    right = np.maximum(-shift, 0)
    # gemmlowp's SaturatingRoundingMultiplyByPOT: a left shift that leaves int32 saturates.
    scaled = np.clip(x << left, INT32_MIN, INT32_MAX)
    return rounding_divide_by_pot(saturating_rounding_doubling_high_mul(scaled, m0), right)


def requantize(
    acc: np.ndarray,
    m0: np.ndarray,
    shift: np.ndarray,
    zero_point: np.ndarray | int,
    qmin: int,
    qmax: int,
    rounding: RequantRounding = RequantRounding.DOUBLE,
) -> np.ndarray:
    """int32 accumulator -> output codes: `clamp(MBQM(acc) + z, qmin, qmax)` (eq. 12).

    A fused ReLU or ReLU6 is the clamp itself: pass its bounds in codes as `qmin`/`qmax`.

    >>> m0, shift = quantize_multiplier(0.01)
    >>> requantize(np.array([1000, -1000, 5000]), m0, shift, 3, -128, 127)  # 10+3, -10+3, 50+3
    array([13, -7, 53], dtype=int32)
    """
    acc = np.asarray(acc)
    if acc.dtype.kind not in "iu":
        raise DataError(f"requantize expects an integer accumulator, got dtype {acc.dtype}")
    if acc.size and (acc.min() < INT32_MIN or acc.max() > INT32_MAX):
        raise DataError(
            "the accumulator holds values outside int32; an int32 accumulator cannot overflow "
            "here, so compute it with int64 and saturate first if you model narrower hardware"
        )
    scaled = multiply_by_quantized_multiplier(acc, m0, shift, rounding)
    return np.clip(scaled + np.asarray(zero_point, dtype=np.int64), qmin, qmax).astype(np.int32)
