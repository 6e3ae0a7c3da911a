"""Streaming error metrics between a reference tensor and its approximation."""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np

from qdq.errors import DataError

# Elements per piece when reports sum a large tensor (`ErrorStats.update`'s `block`): three
# float64 pieces (768 kB) stay in a core's L2 cache.
REPORT_BLOCK = 1 << 15


@dataclass
class ErrorStats:
    """Sums that give SQNR, cosine similarity and max error over any number of batches.

    SQNR = 10 log10(sum x^2 / sum (x - y)^2) dB; cosine = sum xy / sqrt(sum x^2 sum y^2).
    An output of integers (a label, a class map, a mask) also counts the values equal to FP32's:
    its SQNR weighs a wrong class by how far apart the two class numbers happen to be.
    """

    signal: float = 0.0
    noise: float = 0.0
    dot: float = 0.0
    other: float = 0.0
    max_abs: float = 0.0
    top1: int = 0
    top5: int = 0
    rows: int = 0
    equal: int = 0  # an integer output's values equal to FP32's, of `values`
    values: int = 0  # an integer output's values seen (0: not one)
    classes: bool = False
    unmatched: int = 0  # batches left out: their shapes differ (a size set by the data)

    def update(
        self, reference: np.ndarray, approximation: np.ndarray, block: int | None = None
    ) -> None:
        """Add a batch. `block`: sum it in pieces of that many elements, each in the caches
        (what reports use: per-layer tensors of millions of elements, where whole-batch
        float64 copies made the pass memory-bound, 2.5x slower and slower still on two
        workers at once); the sums then differ from whole-batch ones in the last bits. None:
        the whole batch at once (what plans are scored with; a batch of at most `block`
        elements gives the same bits either way)."""
        if block is not None and (not isinstance(block, int) or block < 1):
            raise DataError(f"`block` must be a whole number of elements >= 1, got {block!r}")
        if reference.shape != approximation.shape:  # would broadcast, or compare a prefix
            raise DataError(
                f"an output of shape {list(approximation.shape)} is compared with FP32's of "
                f"shape {list(reference.shape)}; compare a model with the one it was made from"
            )
        x, y = reference.ravel(), approximation.ravel()
        size = block or max(x.size, 1)
        buffers = np.empty((3, min(size, x.size)))
        peak = np.zeros(())
        for start in range(0, x.size, size):
            sums, top = _sums(x[start : start + size], y[start : start + size], buffers)
            self.signal += sums[0]
            self.noise += sums[1]
            self.dot += sums[2]
            self.other += sums[3]
            peak = np.maximum(peak, top)  # a NaN error stays NaN, as in one np.max
        self.max_abs = float(np.maximum(self.max_abs, peak))  # (max() would drop a NaN)
        if reference.dtype.kind in "biu":
            self.values += x.size
            self.equal += int(np.count_nonzero(x == y))
        if looks_like_scores(reference) and len(reference):  # (0, K): a detector found none
            self.classes = True
            self.rows += len(reference)
            best = reference.argmax(axis=1)
            self.top1 += int((best == approximation.argmax(axis=1)).sum())
            top = np.argsort(-approximation, axis=1)[:, :5]
            self.top5 += int((top == best[:, None]).any(axis=1).sum())

    def merged(self, other: ErrorStats) -> ErrorStats:
        """The sums of two shards of the same tensor together (maxima taken)."""
        if not isinstance(other, ErrorStats):
            raise DataError(f"merge takes another ErrorStats, got {type(other).__name__}")
        sums = {f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self)}
        peak = float(np.maximum(self.max_abs, other.max_abs))
        sums.update(max_abs=peak, classes=self.classes or other.classes)
        return ErrorStats(**sums)

    @property
    def sqnr_db(self) -> float:
        return float(sqnr_db(self.signal, self.noise))

    @property
    def cosine(self) -> float:
        """1 where both are all zeros, 0 where one alone is (no direction to share)."""
        denominator = np.sqrt(self.signal * self.other)
        if not denominator:
            return 1.0 if self.signal == self.other == 0 else 0.0
        with np.errstate(invalid="ignore"):  # inf / inf: an output that is Inf somewhere
            return float(self.dot / denominator)

    @property
    def blank(self) -> bool:
        """Every batch was of another shape than FP32's: nothing measured, nothing to claim
        (its cosine had read 1.0, a perfect match of nothing)."""
        measured = self.signal or self.noise or self.other or self.values
        return bool(self.unmatched) and not measured

    def as_dict(self) -> dict[str, float | None]:
        blank = self.blank
        out: dict[str, float | None] = {
            "sqnr_db": None if blank else self.sqnr_db,
            "cosine": None if blank else self.cosine,
            "max_abs_error": None if blank else self.max_abs,
        }
        if self.classes and self.rows:
            out["top1_agreement"] = self.top1 / self.rows
            out["top5_agreement"] = self.top5 / self.rows
        if self.values:
            out["equal_share"] = self.equal / self.values
        if self.unmatched:
            out["batches_of_another_shape"] = self.unmatched
        return out


def _sums(
    reference: np.ndarray, approximation: np.ndarray, buffers: np.ndarray
) -> tuple[list[float], np.ndarray]:
    """Sum x^2, sum e^2, sum xy, sum y^2 in float64 (e = x - y, 0 where equal), and max |e|,
    of one piece, in `buffers` (3, at least its size)."""
    n = reference.size
    x, y, error = buffers[0, :n], buffers[1, :n], buffers[2, :n]
    np.copyto(x, reference)
    np.copyto(y, approximation)
    with np.errstate(invalid="ignore"):
        np.subtract(x, y, out=error)
    # einsum, not BLAS: OpenBLAS's threaded dot sums in an order that depends on its thread
    # count, and each worker's BLAS took every core (2 evaluation workers: 1.6x slower).
    sums = [float(np.einsum("i,i->", a, b)) for a, b in ((x, x), (error, error), (x, y), (y, y))]
    if not np.isfinite(sums[1]):  # inf - inf: an infinite output kept is exact
        np.copyto(error, 0.0, where=x == y)  # only then: a pass fewer over every piece
        sums[1] = float(np.einsum("i,i->", error, error))
    return sums, np.max(np.abs(error, out=error)) if n else np.zeros(())


def sqnr_db(signal: float | np.ndarray, noise: float | np.ndarray) -> float | np.ndarray:
    """SQNR in dB from summed (or mean) squares of the signal and of the error, elementwise:
    10 log10(signal / noise), infinite where the error is exactly 0.

    >>> float(sqnr_db(100.0, 1.0)), float(sqnr_db(1.0, 0.0))
    (20.0, inf)
    """
    signal, noise = np.asarray(signal, np.float64), np.asarray(noise, np.float64)
    # inf / inf: undefined, NaN; x / inf: 0, -inf dB
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.maximum(signal, 1e-300) / noise
        return np.where(noise == 0, np.inf, 10 * np.log10(np.where(noise == 0, 1.0, ratio)))


def nonfinite_notes(stats: dict[str, ErrorStats]) -> list[str]:
    """A note per output whose FP32 values are NaN or Inf on the data: its SQNR and cosine
    are undefined, which 'nan dB' alone does not explain."""
    return [
        f"the float model's output {name!r} is NaN or Inf on these samples, so "
        "its SQNR and cosine are undefined; are the inputs preprocessed as the model expects?"
        for name, s in stats.items()
        if not np.isfinite(s.signal)
    ]


def measurable(value: object) -> bool:
    """Whether a tensor holds numbers (bools included), which ErrorStats measures; strings and
    sequences have no error to measure."""
    return isinstance(value, np.ndarray) and value.dtype.kind in "biuf"


def looks_like_scores(output: np.ndarray) -> bool:
    """A (batch, classes) float array with 2..100000 classes: logits or probabilities."""
    return output.ndim == 2 and 2 <= output.shape[1] <= 100_000 and output.dtype.kind == "f"
