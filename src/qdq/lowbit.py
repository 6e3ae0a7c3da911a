"""Low-bit weight grids: binary, ternary and power-of-two codes times one scale per channel
(docs/quantization.md, §16-§18).

A `WeightGrid` says which values a weight may take; the weight's `QScheme` still says the rest
(granularity, storage bits, a power-of-two scale). The codes are plain signed integers with zero
point 0, so ONNX Runtime's DequantizeLinear reads them as it reads any int8 weight:

>>> from qdq.scheme import INT8_WEIGHTS
>>> codes, scale = grid_codes(np.array([[0.5, -1.5]]), WeightGrid.BINARY, INT8_WEIGHTS)
>>> codes.tolist(), scale.tolist()
([[1, -1]], [1.0])
"""

from __future__ import annotations

import enum

import numpy as np

from qdq.errors import DataError, SchemeError, choice, expect
from qdq.qparams import MIN_SCALE
from qdq.scheme import PerChannel, PerTensor, QScheme

TWN_THRESHOLD = (
    0.7  # TWN's delta = 0.7 E|w|, their approximation for Gaussian and uniform w (eq. 26)
)
# Power-of-two scales searched per channel: 16 per octave over two octaves below max|w| / top
# code (eq. 29). The grid repeats every octave, so the first covers every alignment with the
# weights; the second lets a channel clip its largest weights to resolve the small ones.
STEPS_PER_OCTAVE = 16
OCTAVES = 2


class WeightGrid(enum.StrEnum):
    """The values a weight may take, in units of its channel's scale."""

    UNIFORM = "uniform"  # every integer in [qmin, qmax]: the affine grid (§1-§7)
    BINARY = "binary"  # {-1, +1}, scale mean|w| (XNOR-Net, §16)
    TERNARY = "ternary"  # {-1, 0, +1}, threshold 0.7 mean|w| (TWN, §17)
    POWER_OF_TWO = "power_of_two"  # {0, +-1, +-2, ..., +-2^(bits-2)} (§18)


def grid_codes(w: np.ndarray, grid: WeightGrid, scheme: QScheme) -> tuple[np.ndarray, np.ndarray]:
    """Integer codes (the scheme's storage dtype) and float32 scales, one per slice along the
    scheme's `PerChannel` axis (shape `(C,)`) or one for all (`PerTensor`, shape `()`), so that
    `codes * scale` is the quantized weight."""
    grid = choice(WeightGrid, grid, "weight grid")  # a name compared by `is` matched nothing
    expect(scheme, QScheme, "the scheme", "e.g. qdq.scheme.INT8_WEIGHTS")
    check_grid(grid, scheme)
    rows, axis = _rows(w, scheme)
    if grid is WeightGrid.BINARY:
        codes, scale = binarize(rows, scheme.power_of_two_scale)
    elif grid is WeightGrid.TERNARY:
        codes, scale = ternarize(rows, scheme.power_of_two_scale)
    else:
        codes, scale = power_of_two_codes(rows, scheme.bits, scheme.power_of_two_scale)
    w_shape = np.shape(w)
    if axis is None:
        return codes.reshape(w_shape).astype(scheme.storage_dtype), scale.reshape(())
    codes = np.moveaxis(codes.reshape(_moved_shape(w_shape, axis)), 0, axis)
    return codes.astype(scheme.storage_dtype), scale


def binarize(rows: np.ndarray, power_of_two_scale: bool) -> tuple[np.ndarray, np.ndarray]:
    """XNOR-Net on each row of `rows` (C, K): codes sign(w) with sign(0) = +1, scale mean|w|
    (eq. 25), or the power of two nearest it.

    Row [0.5, -1.5, 0.25, -1.75]: mean|w| = 4 / 4 = 1.0 -> codes [1, -1, 1, -1], scale 1.0.
    """
    codes = np.where(rows >= 0, 1, -1)
    scale = np.abs(rows).mean(axis=1)
    return codes, _scale(scale, power_of_two_scale)


def ternary_threshold(rows: np.ndarray) -> np.ndarray:
    """TWN's threshold per row: delta = 0.7 mean|w| (eq. 26), float64."""
    return TWN_THRESHOLD * np.abs(rows).mean(axis=1)


def ternarize(rows: np.ndarray, power_of_two_scale: bool) -> tuple[np.ndarray, np.ndarray]:
    """TWN on each row: codes sign(w) where |w| > delta, else 0; scale = mean of |w| over
    those (eq. 27), or the power of two nearest it.

    Row [1.0, -0.2, 0.1, -0.7]: mean|w| = 0.5, delta = 0.35 -> codes [1, 0, 0, -1],
    scale (1.0 + 0.7) / 2 = 0.85.
    """
    magnitude = np.abs(rows)
    kept = magnitude > ternary_threshold(rows)[:, None]
    codes = np.where(kept, np.where(rows >= 0, 1, -1), 0)
    count = kept.sum(axis=1)
    total = np.where(kept, magnitude, 0.0).sum(axis=1)
    scale = np.divide(total, count, out=np.zeros_like(total), where=count > 0)
    return codes, _scale(scale, power_of_two_scale)


def top_code(bits: int) -> int:
    """The largest power of two a signed `bits`-bit code holds: 2^(bits-2) (64 in int8)."""
    return 1 << (bits - 2)


def snap_to_power_of_two(x: np.ndarray, bits: int) -> np.ndarray:
    """Nearest of {0, +-1, +-2, ..., +-top_code(bits)} to each real `x` (already divided by the
    scale), ties away from zero (eq. 28): int8 [0.4, 0.5, 1.4, 1.5, -5, 47.9, 48, 100] ->
    [0, 1, 1, 2, -4, 32, 64, 64]."""
    levels = 2.0 ** np.arange(bits - 1)  # 1, 2, ..., top_code
    midpoints = np.concatenate([[0.5], 1.5 * levels[:-1]])
    index = np.searchsorted(midpoints, np.abs(x), side="right")
    magnitude = np.concatenate([[0.0], levels])[index]
    return np.copysign(magnitude, x).astype(np.int64)


def power_of_two_scales(absmax: np.ndarray, bits: int, power_of_two_scale: bool) -> np.ndarray:
    """Candidate scales (N, C) for rows whose largest |w| is `absmax` (C,), largest first:
    max|w| / top code (nothing clipped) down two octaves in 16 steps per octave (eq. 29), or
    the three powers of two from 2^ceil(log2(max|w| / top code)) down."""
    base = np.maximum(absmax / top_code(bits), MIN_SCALE)
    if power_of_two_scale:
        steps = np.arange(OCTAVES + 1, dtype=np.float64)
        return 2.0 ** (np.ceil(np.log2(base))[None, :] - steps[:, None])
    steps = np.arange(OCTAVES * STEPS_PER_OCTAVE + 1) / STEPS_PER_OCTAVE
    return base[None, :] * 2.0 ** -steps[:, None]


def power_of_two_codes(
    rows: np.ndarray, bits: int, power_of_two_scale: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Each row on {0, +-2^k} x scale: of the candidate scales, the one whose nearest codes
    leave the least squared error (eq. 30); ties to the larger scale.

    Row [1.0, 0.3, -0.1] in int8 (top code 64): max|w| / 64 = 1/64 is the first candidate;
    1.0 -> 64, 0.3 * 64 = 19.2 -> 16 (0.25), -0.1 * 64 = -6.4 -> -8 (-0.125): squared error
    0.05^2 + 0.025^2 = 0.003125, which no smaller candidate beats, so scale 1/64 it is.
    """
    rows = rows.astype(np.float64)
    candidates = power_of_two_scales(np.abs(rows).max(axis=1), bits, power_of_two_scale)
    errors = np.stack(
        [
            np.square(snap_to_power_of_two(rows / s[:, None], bits) * s[:, None] - rows).sum(1)
            for s in candidates
        ]
    )
    best = np.argmin(errors, axis=0)  # the first minimum: the larger scale
    scale = candidates[best, np.arange(rows.shape[0])].astype(np.float32)
    codes = snap_to_power_of_two(rows / scale.astype(np.float64)[:, None], bits)
    return codes, scale


def _scale(mean: np.ndarray, power_of_two_scale: bool) -> np.ndarray:
    """A float32 scale per row; a dead (all-zero) row gets the smallest scale (eq. 8). The
    squared error of a fixed code pattern is a parabola in the scale with its minimum at
    `mean`, so the best power of two is the one nearest `mean` (ties to the larger)."""
    mean = np.maximum(mean, MIN_SCALE)
    if power_of_two_scale:
        lower = 2.0 ** np.floor(np.log2(mean))
        mean = np.where(mean - lower >= 2 * lower - mean, 2 * lower, lower)
    return mean.astype(np.float32)


def check_grid(grid: WeightGrid, scheme: QScheme) -> None:
    if grid is WeightGrid.UNIFORM:
        raise SchemeError(
            "the uniform grid's codes come from qdq.affine.quantize; pass binary, ternary or "
            "power_of_two here"
        )
    if not (scheme.signed and scheme.symmetric):
        raise SchemeError(
            f"the {grid} grid stores signed codes with zero point 0; use a signed symmetric "
            "weight scheme such as qdq.scheme.INT8_WEIGHTS"
        )
    if not isinstance(scheme.granularity, PerChannel | PerTensor):
        raise SchemeError(
            f"the {grid} grid has one scale per channel or per tensor, not "
            f"{scheme.granularity}; use PerChannel(axis) or PerTensor()"
        )


def _rows(w: np.ndarray, scheme: QScheme) -> tuple[np.ndarray, int | None]:
    """`w` as (C, K) float64 rows, one per channel (one row per tensor), and the axis."""
    w = np.asarray(w)
    if w.dtype.kind != "f" or w.size == 0:
        raise DataError(f"low-bit grids take a non-empty float weight, got {w.dtype} {w.shape}")
    if not np.isfinite(w).all():
        raise DataError("cannot put a weight holding NaN or Inf on a grid; fix the model")
    if np.abs(w).max() > np.finfo(np.float32).max / 2:  # a power-of-two scale may double it
        raise DataError(
            f"a weight of magnitude {np.abs(w).max():.3g} needs a scale beyond float32's range "
            "(scales are float32); values this large mean a broken weight"
        )
    if isinstance(scheme.granularity, PerTensor):
        return w.astype(np.float64).reshape(1, -1), None
    axis = scheme.granularity.axis
    if not -w.ndim <= axis < w.ndim:
        raise DataError(f"axis {axis} is out of range for a weight of rank {w.ndim}")
    axis %= w.ndim
    return np.moveaxis(w, axis, 0).astype(np.float64).reshape(w.shape[axis], -1), axis


def _moved_shape(shape: tuple[int, ...], axis: int) -> tuple[int, ...]:
    return (shape[axis], *shape[:axis], *shape[axis + 1 :])


__all__ = [
    "WeightGrid",
    "binarize",
    "grid_codes",
    "power_of_two_codes",
    "power_of_two_scales",
    "snap_to_power_of_two",
    "ternarize",
    "ternary_threshold",
    "top_code",
]
