"""Per-tensor choice of the range estimator (`--method auto`): let the data decide.

From one histogram, the candidate ranges of MinMax, Percentile, KL and MSE are computed; each is
scored by the squared error of fake-quantizing the histogram's bin centres (weighted by their
counts) on the grid that range gives, and the best wins. Entropy calibration is known to hurt
detector regression heads and help CNN features; this picks per tensor instead of per model.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from qdq.affine import fake_quantize
from qdq.observers.histogram import Histogram
from qdq.observers.kl import KL
from qdq.observers.mse import MSE
from qdq.observers.percentile import Percentile
from qdq.qparams import Range, choose_qparams
from qdq.scheme import QScheme

KL_STRIDE = 8  # one end bin in 8: KL is one candidate of four here, and its search dominates


@dataclass(frozen=True)
class Auto:
    """The candidate range with the least expected squared error on the `bits`-bit grid."""

    bits: int = 8
    symmetric: bool = False  # the grid the range will be used on: score candidates on that one
    narrow_range: bool = False  # ... and whether it drops its lowest code
    kl: bool = True  # KL's search is most of the cost (YOLOv8n: 25 of 30 s); `best` skips it

    def __call__(self, hist: Histogram) -> Range:
        return self.candidates(hist)["auto"]

    def candidates(self, hist: Histogram) -> dict[str, Range]:
        """Each candidate's range, and per channel the best of them ("auto"): one histogram
        gives every method's range, so a caller can also try them whole (`--method best`)."""
        candidates = {"minmax": Range(hist.lo, hist.hi), "percentile": Percentile()(hist)}
        if self.kl:
            candidates["kl"] = KL(min(self.bits, 8), KL_STRIDE, self.symmetric)(hist)
        candidates["mse"] = MSE(self.bits)(hist)
        narrow = self.narrow_range and self.symmetric  # a narrow grid is a signed one
        grid = QScheme(
            self.bits, signed=self.symmetric, symmetric=self.symmetric, narrow_range=narrow
        )
        half = hist.half
        centres = (np.arange(2 * half) - half + 0.5) * hist.width[:, None]
        best_lo, best_hi = np.array(hist.lo), np.array(hist.hi)
        for c in range(hist.counts.shape[0]):
            errors = {}
            for name, rng in candidates.items():
                qparams = choose_qparams(Range(rng.lo[c], rng.hi[c]), grid)
                row = centres[c].astype(np.float32)
                # float64: a hostile tensor's bins near float32's limit overflow its square
                error = row.astype(np.float64) - fake_quantize(row, qparams).astype(np.float64)
                errors[name] = float(hist.counts[c] @ error**2)
            winner = min(errors, key=errors.get)
            best_lo[c], best_hi[c] = candidates[winner].lo[c], candidates[winner].hi[c]
        return {**candidates, "auto": Range(best_lo, best_hi)}
