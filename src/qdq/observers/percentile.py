"""Percentile calibration: clip the rarest values (docs/quantization.md, §12)."""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import numpy as np

from qdq.errors import SchemeError, expect
from qdq.observers.histogram import Histogram
from qdq.qparams import Range


@dataclass(frozen=True)
class Percentile:
    """Range holding `percentile` % of the values.

    Symmetric: the percentile of |x| gives `[-t, t]` (`[0, t]` for data >= 0), NVIDIA's way.
    Asymmetric (default): `(100 - p) / 2` % is cut from each tail of the signed data, and the
    whole `100 - p` % from the one tail of data on one side of zero (a ReLU's output), so that
    the range holds `p` % there too (cutting half of it at zero, which the range holds anyway,
    kept CenterFace's ReLU outputs 8% wider than ONNX Runtime's; docs/ptq.md, stop 58).
    ONNX Runtime's default is 99.999, NVIDIA's 99.99.
    """

    percentile: float = 99.999
    symmetric: bool = False

    def __post_init__(self) -> None:
        expect(self.percentile, numbers.Real, "percentile")
        if not 50.0 < self.percentile <= 100.0:
            raise SchemeError(
                f"percentile must be in (50, 100], got {self.percentile}; "
                "99.99 or 99.999 is typical"
            )

    def __call__(self, hist: Histogram) -> Range:
        q = self.percentile / 100.0
        if self.symmetric:
            counts, width = hist.magnitude()
            t = _quantile(counts, np.zeros_like(width), width, q)
            t = np.minimum(t, np.maximum(-hist.lo, hist.hi))
            return Range(np.where(hist.lo < 0, -t, 0.0), t)
        # data on one side of zero (a ReLU's output): the range holds zero, so a cut at the
        # zero side holds nothing back and the whole share comes off the far tail
        cut = (1.0 - q) / 2
        low_share, high_share = (
            np.where(hist.hi <= 0, 1.0 - q, cut),
            np.where(hist.lo >= 0, q, 1.0 - cut),
        )
        lo = _quantile(hist.counts, -hist.amax, hist.width, low_share, upper=False)
        hi = _quantile(hist.counts, -hist.amax, hist.width, high_share)
        return Range(np.clip(lo, hist.lo, hist.hi), np.clip(hi, hist.lo, hist.hi))


def _quantile(
    counts: np.ndarray,
    first_edge: np.ndarray,
    width: np.ndarray,
    q: float | np.ndarray,
    upper: bool = True,
) -> np.ndarray:
    """Per row, the value below which a fraction `q` (one, or one per row) of the mass lies,
    linear within a bin. Where `q` of the mass is a whole number of values, the range's end
    hugs the values it keeps: an upper end at the top of the last kept value's bin, a lower
    (`upper=False`) at the bottom of the first kept value's, whatever float rounding did to
    `q * N` (99.9% of 1000 values is 999.0000000000001: the cut outlier's bin had been taken)."""
    out = np.empty(counts.shape[0])
    share = np.broadcast_to(np.asarray(q, np.float64).reshape(-1), counts.shape[:1])
    for c, row in enumerate(counts):
        cdf = np.cumsum(row)
        target = share[c] * cdf[-1]
        if abs(target - np.rint(target)) <= 1e-9 * cdf[-1]:
            target = np.rint(target)
        side = "left" if upper else "right"
        j = min(int(np.searchsorted(cdf, target, side=side)), row.size - 1)
        before = cdf[j - 1] if j else 0.0
        inside = (target - before) / row[j] if row[j] > 0 else 1.0
        out[c] = first_edge[c] + (j + inside) * width[c]
    return out
