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

    For a candidate `t` with step `s = t / qmax`: noise `N_in * s^2 / 12` for the values inside
    and `sum n_j (c_j - t)^2` for the bin centres beyond. Every bin edge is a candidate. `qmax`
    is `2^b - 1` for data on one side of zero (>= 0, or <= 0: the range `[0, t]` or `[-t, 0]`)
    and `2^(b-1) - 1` for data of both signs, whatever the grid: a step a little wider than an
    asymmetric grid's `2t / (2^b - 1)`, a third wider at 2 bits (12% more error than the best
    threshold there), which at 8 bits measured better on qdq's unseen models than the grid's
    own (docs/quantization.md, §13).
    """

    bits: int = 8

    def __post_init__(self) -> None:
        expect(self.bits, numbers.Integral, "MSE's bits")
        if not 2 <= self.bits <= 16:
            raise SchemeError(f"MSE calibration needs bits in 2..16, got {self.bits}")

    def __call__(self, hist: Histogram) -> Range:
        counts, width = hist.magnitude()
        qmax = np.where(hist.one_sided, 2.0**self.bits - 1, 2.0 ** (self.bits - 1) - 1)[:, None]
        centres = (np.arange(counts.shape[1]) + 0.5) * width[:, None]
        t = np.arange(counts.shape[1] + 1) * width[:, None]  # candidate thresholds: bin edges
        beyond = [_suffix_sums(counts * centres**k) for k in (0, 1, 2)]
        clipping = beyond[2] - 2 * t * beyond[1] + t**2 * beyond[0]
        rounding = (counts.sum(axis=1, keepdims=True) - beyond[0]) * (t / qmax) ** 2 / 12
        error = np.where(t > 0, clipping + rounding, np.inf)
        best = np.take_along_axis(t, np.argmin(error, axis=1)[:, None], axis=1)[:, 0]
        return hist.sides(np.minimum(best, np.maximum(-hist.lo, hist.hi)))


def _suffix_sums(values: np.ndarray) -> np.ndarray:
    """s[:, i] = sum of values[:, i:], with a trailing 0 column for i == bins."""
    s = np.cumsum(values[:, ::-1], axis=1)[:, ::-1]
    return np.concatenate([s, np.zeros((values.shape[0], 1))], axis=1)
