"""A streaming histogram of bounded size, per tensor or per channel (docs/quantization.md, §10).

Each channel's histogram covers `[-half * width, half * width]` with `2 * half` equal bins, so the
magnitude histogram TensorRT's KL needs is an exact fold of the signed one, and asymmetric
percentiles read the signed one directly. The first batch sets `width = absmax / bins`, for the
finest resolution. A later batch beyond the range appends bins of the same width, as NVIDIA's
reference does, up to `max_bins` per sign; past that, neighbouring bins merge in groups of a
power of two. Both are exact (no mass smeared between bins), and memory never exceeds
`channels * 2 * max_bins` counts however many batches arrive. Shards with unrelated grids merge by
re-binning onto the coarser grid, uniform within each bin.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable
from functools import cache
from typing import Protocol

import numpy as np

from qdq.errors import ArgumentError, ObserverStateError, expect
from qdq.observers.base import check_finite, check_mergeable, checked_batch, no_data_error
from qdq.qparams import Range

# Values binned at a time, so that the temporaries (1 MiB each) stay in cache: 2^18 ran 1.7x
# faster than 2^22 on a 4.8M-value activation. (Per channel, a chunk holds at least one column
# per bin, so temporaries scale with the histogram itself.)
CHUNK = 1 << 18
# The compiled count's copies of the counts (`_count`), used on rows of at least LANES_FROM
# values per bin (below that, clearing and summing the copies costs more than they save).
LANES = 4
LANES_FROM = 8


class Histogram:
    """Counts of a float tensor in `2 * half` bins of `width` around 0, one row per channel."""

    def __init__(self, bins: int = 2048, axis: int | None = None, max_bins: int = 16384) -> None:
        expect(bins, numbers.Integral, "bins")
        expect(max_bins, numbers.Integral, "max_bins")
        if bins < 128 or bins & (bins - 1):
            raise ObserverStateError(
                f"bins must be a power of two >= 128 (bins per sign), got {bins}; 2048 is typical"
            )
        if max_bins < bins:
            raise ObserverStateError(f"max_bins ({max_bins}) must be >= bins ({bins})")
        self.bins = bins
        self.max_bins = max_bins
        self.axis = axis
        self.counts: np.ndarray | None = None  # (channels, 2 * half), float64
        self.width: np.ndarray | None = None  # (channels,); 0 while only zeros were seen
        self.lo: np.ndarray | None = None  # exact observed min per channel
        self.hi: np.ndarray | None = None

    @property
    def seen(self) -> bool:
        return self.counts is not None

    @property
    def half(self) -> int:
        """Bins per sign."""
        return self.counts.shape[1] // 2

    @property
    def amax(self) -> np.ndarray:
        """Per channel, the magnitude the bins reach."""
        return self.width * self.half

    @property
    def one_sided(self) -> np.ndarray:
        """Per channel, whether every value seen lies on one side of zero (>= 0 or <= 0)."""
        return (self.lo >= 0) | (self.hi <= 0)

    def sides(self, t: np.ndarray) -> Range:
        """`[-t, t]` less the side of zero no value reached (a LogSoftmax's: `[-t, 0]`)."""
        return Range(np.where(self.lo >= 0, 0.0, -t), np.where(self.hi <= 0, 0.0, t))

    def update(self, batch: np.ndarray) -> None:
        channels = None if self.counts is None else self.counts.shape[0]
        rows = _as_rows(checked_batch(batch, self.axis, channels), self.axis)
        lo, hi = rows.min(axis=1).astype(np.float64), rows.max(axis=1).astype(np.float64)
        check_finite(lo, hi, rows)
        absmax = np.maximum(-lo, hi)
        if self.counts is None:
            self.counts = np.zeros((rows.shape[0], 2 * self.bins))
            self.width, self.lo, self.hi = absmax / self.bins, lo, hi
        else:
            self.lo, self.hi = np.minimum(self.lo, lo), np.maximum(self.hi, hi)
            self._cover(absmax)
        self.counts += _bin_rows(rows, self.width, self.half, (lo, hi))

    def merge(self, other: Histogram) -> None:
        if (other.bins, other.max_bins, other.axis) != (self.bins, self.max_bins, self.axis):
            raise ObserverStateError(
                f"cannot merge a histogram of bins={other.bins}, max_bins={other.max_bins}, "
                f"axis={other.axis} into bins={self.bins}, max_bins={self.max_bins}, "
                f"axis={self.axis}"
            )
        if other.counts is None:
            return
        if self.counts is None:
            self.counts, self.width = other.counts.copy(), other.width.copy()
            self.lo, self.hi = other.lo.copy(), other.hi.copy()
            return
        if other.counts.shape[0] != self.counts.shape[0]:
            raise ObserverStateError(
                f"cannot merge histograms of {other.counts.shape[0]} and {self.counts.shape[0]} "
                "channels; merge shards of one tensor"
            )
        width = np.maximum(self.width, other.width)
        reach = np.maximum(self.amax, other.amax)
        needed = np.ceil(reach / np.where(width > 0, width, 1.0))
        width = width * _coarsening(needed, self.max_bins)
        half = int(min(max(needed.max(), self.bins), self.max_bins))
        self.counts = _rebin(self.counts, self.width, width, half) + _rebin(
            other.counts, other.width, width, half
        )
        self.width = width
        self.lo, self.hi = np.minimum(self.lo, other.lo), np.maximum(self.hi, other.hi)

    def magnitude(self) -> tuple[np.ndarray, np.ndarray]:
        """Counts of |x| in `half` bins from 0, and each channel's bin width."""
        half = self.half
        return self.counts[:, half:] + self.counts[:, half - 1 :: -1], self.width

    def _cover(self, absmax: np.ndarray) -> None:
        """Extend (same width) or coarsen (exact merges) so every channel reaches `absmax`."""
        self.width = np.where(self.width == 0, absmax / self.bins, self.width)  # zeros stay central
        with np.errstate(over="ignore"):
            needed = np.ceil(absmax / np.where(self.width > 0, self.width, 1.0))
        # bins too fine to count how many more the new values need (float64 subnormal widths:
        # `needed` overflows): their values are zeros at the new scale, and stay central
        tiny = ~np.isfinite(needed)
        self.width = np.where(tiny, absmax / self.bins, self.width)
        needed = np.where(tiny, self.bins, needed)
        if needed.max() <= self.half and not tiny.any():
            return
        grown = int(min(max(needed.max(), 2 * self.half), self.max_bins))
        if needed.max() > self.half and grown > self.half:
            pad = grown - self.half
            self.counts = np.pad(self.counts, ((0, 0), (pad, pad)))
        factor = _coarsening(needed, self.half)
        for c in np.flatnonzero(factor > 1):
            self.counts[c] = _fold(self.counts[c], int(factor[c]))
        for c in np.flatnonzero(tiny):
            self.counts[c] = _fold(self.counts[c], self.half)
        self.width = self.width * factor


def _coarsening(needed: np.ndarray, limit: int) -> np.ndarray:
    """Per channel, the power of two by which bins must widen so `needed` fits in `limit`."""
    ratio = np.maximum(needed / limit, 1.0)
    return np.exp2(np.ceil(np.log2(ratio)))


def _as_rows(batch: np.ndarray, axis: int | None) -> np.ndarray:
    """(channels, elements) view: one row per channel, or a single row per tensor."""
    if axis is None:
        return batch.reshape(1, -1)
    return np.moveaxis(batch, axis, 0).reshape(batch.shape[axis], -1)


def _bin_rows(
    rows: np.ndarray,
    width: np.ndarray,
    half: int,
    extremes: tuple[np.ndarray, np.ndarray] | None = None,
) -> np.ndarray:
    """Counts of each row in `2 * half` bins of `width` around 0: bin `floor(x / width + half)`,
    with `1 / width` and the sum in the rows' float type. A value at +amax lands in an extra
    bin past the last, folded back afterwards (with the range covering every value, float32
    rounding can overshoot by less than one bin). Compiled where Numba is installed (one pass,
    no temporaries: 2.5-6x faster, docs/ptq.md), else vectorized NumPy: the same counts.
    `extremes`: each row's minimum and maximum, if known, for the check that every index
    falls in the counts."""
    channels = rows.shape[0]
    size = 2 * half
    stride = size + 1  # per row: the bins and the overflow bin
    with np.errstate(over="ignore"):  # inf where width < 5.6e-309: capped below
        per_unit = np.divide(1.0, width, out=np.zeros_like(width), where=width > 0)
    # Float32 rows whose 1 / width float32 cannot hold (values of 1e-37 or subnormals) are
    # binned in float64, and 1 / width is capped at the type's largest (float64 values under
    # 1e-305), which only moves values toward 0: inf * 0 was a NaN index the compiled loop
    # wrote outside its counts (heap corruption), and a cap at float32's largest had put 99%
    # of the values in the central bins. Float64 rows stay float64 (in float32, 1 / width of
    # values past 1e41 was 0).
    if rows.dtype == np.float32 and per_unit.max() > np.finfo(np.float32).max:
        rows = rows.astype(np.float64)
    per_unit = np.minimum(per_unit, np.finfo(rows.dtype).max).astype(rows.dtype)
    # The loops write at unchecked indices (the compiled one's unsigned: a value below -1
    # there would write outside the counts), so a range that does not cover the rows is an
    # error here, never a stray write. Per row, in float64: free beside the binning; a
    # covered value lands within a thousandth of a bin of the ends, the test half a bin out.
    lo, hi = extremes if extremes is not None else (rows.min(axis=1), rows.max(axis=1))
    low, high = (np.asarray(e, np.float64) * per_unit + half for e in (lo, hi))
    if (low < -0.5).any() or (high > size + 0.5).any():
        raise ObserverStateError(
            f"internal error: a histogram of {size} bins of width {width.min():.3g} does not "
            f"cover values from {np.min(lo):.6g} to {np.max(hi):.6g}; please report it"
        )
    if compiled := _compiled_count():
        counts = np.zeros((channels, stride), dtype=np.int64)
        compiled(np.ascontiguousarray(rows), per_unit, rows.dtype.type(half), counts)
    else:
        counts = _count_numpy(rows, per_unit, half, stride)
    counts[:, size - 1] += counts[:, size]  # x == amax belongs to the last bin
    return counts[:, :size].astype(np.float64)


def _count_numpy(rows: np.ndarray, per_unit: np.ndarray, half: int, stride: int) -> np.ndarray:
    """`_bin_rows`' counts, overflow bin included, as a vectorized bincount. Indices are int32
    (float32 -> int64 conversion cost more than the count itself) and not clamped."""
    channels, n = rows.shape
    index_type = np.int32 if channels * stride < 2**31 else np.int64
    offsets = (np.arange(channels, dtype=index_type) * stride)[:, None]
    counts = np.zeros(channels * stride, dtype=np.int64)
    # Columns per chunk: CHUNK values, but never fewer columns than a row has bins, or the
    # bincount's output (channels * stride) would dwarf its input (4096 channels: 5x slower).
    step = max(1, CHUNK // channels, stride)
    for start in range(0, n, step):
        scaled = rows[:, start : start + step] * per_unit[:, None]
        scaled += np.float32(half)
        index = scaled.astype(index_type)  # >= 0, so truncation floors
        if channels > 1:
            index += offsets
        counts += np.bincount(index.ravel(), minlength=channels * stride)
    return counts.reshape(channels, stride)


def _count(rows, per_unit, half, counts):
    """`_count_numpy` as one loop: the same float arithmetic, then truncation. Every value is
    above -1 there (`_bin_rows` checks), so the index is unsigned: no check for a negative
    index, a fifth faster (ddddocr's detector's activations: 40 -> 32 ms a sample, the same
    counts). A long row is counted into four copies of the counts in turn, summed at the end:
    with one, runs of values in one bin (a ReLU's zeros) wait on each other's increments
    (4.9 -> 0.65 ns a value on ReLU outputs, 7.7 -> 0.7 on normal ones: the same counts)."""
    stride = counts.shape[1]
    lanes = np.zeros((LANES, stride), counts.dtype)
    for c in range(rows.shape[0]):
        scale = per_unit[c]
        row = rows[c]
        n = row.shape[0]
        start = 0
        if n >= LANES_FROM * stride:
            lanes[:] = 0
            start = n - n % LANES
            for i in range(0, start, LANES):
                lanes[0, np.uint32(row[i] * scale + half)] += 1
                lanes[1, np.uint32(row[i + 1] * scale + half)] += 1
                lanes[2, np.uint32(row[i + 2] * scale + half)] += 1
                lanes[3, np.uint32(row[i + 3] * scale + half)] += 1
            for b in range(stride):
                counts[c, b] += lanes[0, b] + lanes[1, b] + lanes[2, b] + lanes[3, b]
        for i in range(start, n):
            counts[c, np.uint32(row[i] * scale + half)] += 1


@cache
def _compiled_count() -> Callable | None:
    """`_count` compiled by Numba (the `fast` extra; imported on first use), or None without
    it. No fast-math: the product and sum must round as NumPy's do (no fused multiply-add). No
    GIL: the calibration's threads bin different tensors at once."""
    try:
        from numba import njit
    except ImportError:
        return None
    return njit(cache=True, nogil=True, fastmath=False)(_count)


def _fold(signed: np.ndarray, factor: int) -> np.ndarray:
    """Merge groups of `factor` neighbouring bins outward from 0: the width grows `factor` times."""
    half = signed.size // 2
    out = np.zeros_like(signed)
    for side, sign in ((signed[half:], 1), (signed[half - 1 :: -1], -1)):  # both outward from 0
        if factor >= half:  # a jump by orders of magnitude: all old mass lands in the first bin
            merged = side.sum(keepdims=True)
        else:
            merged = np.pad(side, (0, -half % factor)).reshape(-1, factor).sum(axis=1)
        if sign > 0:
            out[half : half + merged.size] = merged
        else:
            out[half - merged.size : half] = merged[::-1]
    return out


def _rebin(counts: np.ndarray, width: np.ndarray, target: np.ndarray, half: int) -> np.ndarray:
    """Rows moved onto `2 * half` bins of `target` width, mass uniform within each source bin."""
    source_half = counts.shape[1] // 2
    out = np.zeros((counts.shape[0], 2 * half))
    for c in range(counts.shape[0]):
        if width[c] == 0:  # only zeros seen: all of them sit in the bin that starts at 0
            out[c, half] = counts[c].sum()
            continue
        edges = (np.arange(2 * source_half + 1) - source_half) * width[c]
        cdf = np.concatenate([[0.0], np.cumsum(counts[c])])
        new_edges = (np.arange(2 * half + 1) - half) * target[c]
        out[c] = np.diff(np.interp(new_edges, edges, cdf))
    return out


class RangeRule(Protocol):
    """Turns a histogram into a range: KL, Percentile or MSE."""

    def __call__(self, hist: Histogram) -> Range: ...


class HistogramObserver:
    """A `Histogram` plus the rule that picks a clipping range from it.

    >>> from qdq.observers.percentile import Percentile
    >>> o = HistogramObserver(Percentile(99.0))
    >>> o.update(np.linspace(-1, 1, 10001, dtype=np.float32))
    >>> round(float(o.compute().hi), 2)  # 0.5 % of the mass cut from each tail
    0.99
    """

    def __init__(self, rule: RangeRule, bins: int = 2048, axis: int | None = None) -> None:
        if not callable(rule):
            raise ArgumentError(f"rule must be a range rule such as KL(), got {rule!r:.80}")
        self.rule = rule
        self.axis = axis
        self.histogram = Histogram(bins, axis)

    def update(self, batch: np.ndarray) -> None:
        self.histogram.update(batch)

    def merge(self, other: HistogramObserver) -> None:
        check_mergeable(self, other, ("rule", "axis"))
        self.histogram.merge(other.histogram)

    def compute(self) -> Range:
        if not self.histogram.seen:
            raise no_data_error(self)
        rng = self.rule(self.histogram)
        return rng if self.axis is not None else Range(rng.lo[0], rng.hi[0])
