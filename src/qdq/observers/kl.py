"""KL-divergence (entropy) calibration, TensorRT style (docs/quantization.md, §11, eq. 18-20).

Why TensorRT's variant: it is what TensorRT users' calibration caches hold, NVIDIA publishes a
reference of it, and it clips on |x| (one threshold, symmetric), which suits the symmetric int8
that integer kernels use. ONNX Runtime's variant (a signed 128-bin histogram, a window around zero,
eps smoothing) and ncnn's (fractional bin edges, threshold at the bin centre) give different
thresholds; the differences are listed in docs/quantization.md.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import numpy as np

from qdq.errors import SchemeError, expect
from qdq.observers.histogram import Histogram
from qdq.qparams import Range

FIRST_CANDIDATE = 128  # TensorRT's smallest end bin
MAX_CANDIDATES = 2048  # past this many end bins, step over them: the search is O(bins^2)


@dataclass(frozen=True)
class KL:
    """Threshold minimizing KL(P || Q) between the clipped histogram P and its `levels`-level
    quantization Q; `levels` is 2^(bits-1) for data of both signs and 2^bits for data on one
    side of zero (>= 0, or <= 0 as a LogSoftmax's), except on a `symmetric` grid, whose zero
    point in the middle leaves such data half the codes (a TensorRT cache's int8: 128 levels)."""

    bits: int = 8
    stride: int = 1  # every `stride`-th end bin is a candidate (NVIDIA's reference has it too)
    symmetric: bool = False  # the grid the range is for

    def __post_init__(self) -> None:
        expect(self.bits, numbers.Integral, "KL's bits")
        expect(self.stride, numbers.Integral, "KL's stride")
        if self.stride < 1:
            raise SchemeError(f"KL stride must be >= 1, got {self.stride}")
        if not 2 <= self.bits <= 8:
            raise SchemeError(
                f"KL calibration needs bits in 2..8 (the levels must be far fewer than the "
                f"histogram's bins), got {self.bits}; use percentile or mse for wider types"
            )

    def __call__(self, hist: Histogram) -> Range:
        counts, width = hist.magnitude()
        counts = counts.copy()
        counts[:, 0] = counts[:, 1]  # eq. 18: damp the spike of exact zeros (ReLU outputs)
        one_sided = hist.one_sided
        end_bin = np.empty(counts.shape[0], dtype=np.int64)
        for row in range(counts.shape[0]):  # each channel its own search, to its own last bin
            levels = 1 << (self.bits - 1 + int(one_sided[row] and not self.symmetric))
            end_bin[row] = kl_end_bins(counts[row : row + 1], levels, self.stride)[0]
        return hist.sides(np.minimum(end_bin * width, np.maximum(-hist.lo, hist.hi)))


def kl_end_bins(counts: np.ndarray, levels: int, stride: int = 1) -> np.ndarray:
    """For each row of a magnitude histogram, the end bin `i*` (threshold = i* * width)."""
    occupied = np.flatnonzero(counts.any(axis=0))
    stop = int(occupied[-1]) + 1 if occupied.size else 1
    start = min(FIRST_CANDIDATE, stop)
    tail = np.cumsum(counts[:, ::-1], axis=1)[:, ::-1]  # tail[:, i] = mass in bins >= i
    tail = np.concatenate([tail, np.zeros((counts.shape[0], 1))], axis=1)
    stride = max(stride, -(-(stop + 1 - start) // MAX_CANDIDATES))  # wider if bins appended
    candidates = np.arange(start, stop + 1, stride)
    divergences = np.array([_divergence(counts, tail, int(i), levels) for i in candidates])
    # eq. 20: the last argmin, as TensorRT takes it
    return candidates[divergences.shape[0] - 1 - np.argmin(divergences[::-1], axis=0)]


def _divergence(counts: np.ndarray, tail: np.ndarray, i: int, levels: int) -> np.ndarray:
    """KL(P || Q) per row for end bin `i` (eq. 19)."""
    window = counts[:, :i]
    reference = window.copy()
    reference[:, -1] += tail[:, i]  # P: everything beyond the threshold clips onto its last bin
    nonempty = window > 0
    group = np.arange(i) * levels // i  # bin j falls in group floor(j * levels / i)
    starts = np.flatnonzero(np.diff(group, prepend=-1))
    lengths = np.diff(np.append(starts, i))
    mass = np.add.reduceat(window, starts, axis=1)
    filled = np.add.reduceat(nonempty, starts, axis=1)
    spread = np.divide(mass, filled, out=np.zeros_like(mass), where=filled > 0)
    candidate = np.where(nonempty, np.repeat(spread, lengths, axis=1), 0.0)  # Q: empty stay 0
    p_total = reference.sum(axis=1, keepdims=True)  # 0 where a channel held only zeros
    p = np.divide(reference, p_total, out=np.zeros_like(reference), where=p_total > 0)
    q_total = candidate.sum(axis=1, keepdims=True)
    q = np.divide(candidate, q_total, out=np.zeros_like(candidate), where=q_total > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, p * np.log(p / q), 0.0)
    return terms.sum(axis=1)  # +inf where P has mass that Q lacks
