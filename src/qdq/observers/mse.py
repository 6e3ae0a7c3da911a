"""MSE calibration: the threshold minimizing expected squared error (docs/quantization.md, §13)."""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import numpy as np

from qdq.errors import SchemeError, expect
from qdq.observers.histogram import Histogram
from qdq.qparams import Range


@dataclass(frozen=True)
class MSE:
    """Threshold `t` minimizing rounding noise plus clipping error on the |x| histogram (eq. 21).

    For a candidate `t` with step `s = t / qmax`: noise `N_in * s^2 / 12` for the values inside and
    `sum n_j (c_j - t)^2` for the bin centres beyond. Every bin edge is a candidate.
    """

    bits: int = 8

    def __post_init__(self) -> None:
        expect(self.bits, numbers.Integral, "MSE's bits")
        if not 2 <= self.bits <= 16:
            raise SchemeError(f"MSE calibration needs bits in 2..16, got {self.bits}")

    def __call__(self, hist: Histogram) -> Range:
        counts, width = hist.magnitude()
        unsigned = hist.lo >= 0
        qmax = np.where(unsigned, 2.0**self.bits - 1, 2.0 ** (self.bits - 1) - 1)[:, None]
        centres = (np.arange(counts.shape[1]) + 0.5) * width[:, None]
        t = np.arange(counts.shape[1] + 1) * width[:, None]  # candidate thresholds: bin edges
        beyond = [_suffix_sums(counts * centres**k) for k in (0, 1, 2)]
        clipping = beyond[2] - 2 * t * beyond[1] + t**2 * beyond[0]
        rounding = (counts.sum(axis=1, keepdims=True) - beyond[0]) * (t / qmax) ** 2 / 12
        error = np.where(t > 0, clipping + rounding, np.inf)
        best = np.take_along_axis(t, np.argmin(error, axis=1)[:, None], axis=1)[:, 0]
        best = np.minimum(best, np.maximum(-hist.lo, hist.hi))
        return Range(np.where(unsigned, 0.0, -best), best)


def _suffix_sums(values: np.ndarray) -> np.ndarray:
    """s[:, i] = sum of values[:, i:], with a trailing 0 column for i == bins."""
    s = np.cumsum(values[:, ::-1], axis=1)[:, ::-1]
    return np.concatenate([s, np.zeros((values.shape[0], 1))], axis=1)
