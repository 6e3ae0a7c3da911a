"""From a real range and a scheme to a scale and zero point (docs/quantization.md, §2-§6)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from qdq.errors import ArgumentError, RangeError, SchemeError, expect
from qdq.scheme import QScheme

# The floor for a degenerate (constant or all-zero) range: a valid grid, never 0 or NaN. Not
# torch.ao's float32 epsilon (1.2e-7), a grid coarser than tensors whose values are that small
# (PyTorch's MnasNet as initialized: 1e-7 by its last layers, every one of them zeroed); 2^-63 is
# the smallest whose product with another, an int32 bias's scale, stays a normal float32.
MIN_SCALE = 2.0**-63


@dataclass(frozen=True, eq=False)
class Range:
    """Real interval `[lo, hi]`, a scalar for per-tensor or an array for per-channel/per-block.

    >>> Range(-1.0, 3.0).hi
    array(3.)
    """

    lo: np.ndarray
    hi: np.ndarray

    def __post_init__(self) -> None:
        lo, hi = _real(self.lo, "lo"), _real(self.hi, "hi")
        if lo.shape != hi.shape:
            raise RangeError(
                f"lo has shape {lo.shape} but hi has shape {hi.shape}; give equal shapes"
            )
        if not (np.isfinite(lo).all() and np.isfinite(hi).all()):
            raise RangeError(
                f"range [{lo}, {hi}] is not finite; remove NaN/Inf from the calibration data"
            )
        if (lo > hi).any():
            raise RangeError(f"range has lo > hi ({lo} > {hi}); swap them")
        object.__setattr__(self, "lo", lo)
        object.__setattr__(self, "hi", hi)


@dataclass(frozen=True, eq=False)
class QParams:
    """Scale (float32, > 0) and zero point (the scheme's storage dtype) of equal shapes.

    >>> p = QParams(0.5, 10, QScheme(signed=False))
    >>> p.scale, p.zero_point
    (array(0.5, dtype=float32), array(10, dtype=uint8))
    """

    scale: np.ndarray
    zero_point: np.ndarray
    scheme: QScheme

    def __post_init__(self) -> None:
        expect(self.scheme, QScheme, "scheme", "e.g. qdq.QScheme(bits=8)")
        scale = _real(self.scale, "scale").astype(np.float32)
        zp = _real(self.zero_point, "zero_point")
        if not np.array_equal(zp, np.round(zp)):
            raise SchemeError(f"zero_point must hold integers, got {zp}")
        if scale.shape != zp.shape:
            raise SchemeError(f"scale shape {scale.shape} != zero_point shape {zp.shape}")
        if not (np.isfinite(scale).all() and (scale > 0).all()):
            raise SchemeError(f"scale must be finite and > 0, got {scale}")
        s = self.scheme
        if ((zp < s.qmin) | (zp > s.qmax)).any():
            raise SchemeError(f"zero_point {zp} is outside the scheme's codes [{s.qmin}, {s.qmax}]")
        codes = zp.astype(np.float64)  # int8 zero points would wrap in `zp - qmin`
        reach = np.maximum(codes - s.qmin, s.qmax - codes) * scale.astype(np.float64)
        if (reach > np.finfo(np.float32).max).any():
            raise SchemeError(
                f"scale {scale.max():.3g} is too large: the grid's end codes times it pass "
                "float32's largest value (3.4e38), so they would dequantize to Inf; values "
                "this large usually mean an overflow upstream: check the model and the data"
            )
        object.__setattr__(self, "scale", scale)
        object.__setattr__(self, "zero_point", zp.astype(s.storage_dtype))


def choose_qparams(rng: Range, scheme: QScheme) -> QParams:
    """Scale and zero point covering `rng` on `scheme`'s grid, with 0.0 exact (eq. 5-9).

    Worked example, uint8 asymmetric over [-1, 3]: scale = 4 / 255 = 0.015686,
    zero_point = 0 - round(-1 / 0.015686) = 64 (eq. 6).

    >>> p = choose_qparams(Range(-1.0, 3.0), QScheme(signed=False))
    >>> float(p.scale), int(p.zero_point)
    (0.01568627543747425, 64)
    """
    expect(rng, Range, "the range", "build one with qdq.Range(lo, hi) or an observer's compute()")
    expect(scheme, QScheme, "the scheme", "e.g. qdq.QScheme(bits=8)")
    lo = np.minimum(rng.lo, 0.0)  # eq. 5: widen to include 0 so zero padding stays exact
    hi = np.maximum(rng.hi, 0.0)
    qmin, qmax = scheme.qmin, scheme.qmax
    if scheme.symmetric:
        scale = np.maximum(-lo, hi) / ((qmax - qmin) / 2)  # eq. 7
    else:
        scale = (hi - lo) / (qmax - qmin)  # eq. 6
    scale = np.maximum(scale, MIN_SCALE)  # eq. 8: degenerate ranges still give a grid
    if scheme.power_of_two_scale:
        scale = np.exp2(np.ceil(np.log2(scale)))  # eq. 9: round up so the range stays covered
    scale = scale.astype(np.float32)
    if scheme.symmetric:
        zero_point = np.full(scale.shape, 0 if scheme.signed else (qmin + qmax + 1) // 2)
    else:
        zero_point = np.clip(qmin - np.rint(lo / scale), qmin, qmax)
    return QParams(scale, zero_point.astype(np.int64), scheme)


def _real(value: object, what: str) -> np.ndarray:
    """`value` as a float64 array (bfloat16, Fraction and the like convert), or an
    ArgumentError naming `what` (its message built only then: the repr of a per-channel array
    took 4.4 s of MiniLM's 19 s quantize when it was built on every call)."""
    try:
        array = np.asarray(value)
        if array.dtype.kind != "c":  # a cast would drop the imaginary part
            return array.astype(np.float64)
    except (TypeError, ValueError):
        pass
    raise ArgumentError(f"{what} must hold real numbers, got {value!r:.80}")
