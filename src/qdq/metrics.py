"""Streaming error metrics between a reference tensor and its approximation."""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np


@dataclass
class ErrorStats:
    """Sums that give SQNR, cosine similarity and max error over any number of batches.

    SQNR = 10 log10(sum x^2 / sum (x - y)^2) dB; cosine = sum xy / sqrt(sum x^2 sum y^2).
    """

    signal: float = 0.0
    noise: float = 0.0
    dot: float = 0.0
    other: float = 0.0
    max_abs: float = 0.0
    top1: int = 0
    top5: int = 0
    rows: int = 0
    classes: bool = False

    def update(self, reference: np.ndarray, approximation: np.ndarray) -> None:
        x = reference.astype(np.float64).ravel()
        y = approximation.astype(np.float64).ravel()
        with np.errstate(invalid="ignore"):  # inf - inf: an infinite output kept is exact
            error = np.where(x == y, 0.0, x - y)
        # einsum, not BLAS: OpenBLAS's threaded dot sums in an order that depends on its thread
        # count, and each worker's BLAS took every core (2 evaluation workers: 1.6x slower).
        self.signal += float(np.einsum("i,i->", x, x))
        self.noise += float(np.einsum("i,i->", error, error))
        self.dot += float(np.einsum("i,i->", x, y))
        self.other += float(np.einsum("i,i->", y, y))
        self.max_abs = max(self.max_abs, float(np.max(np.abs(error))) if x.size else 0.0)
        if looks_like_scores(reference):
            self.classes = True
            self.rows += len(reference)
            best = reference.argmax(axis=1)
            self.top1 += int((best == approximation.argmax(axis=1)).sum())
            top = np.argsort(-approximation, axis=1)[:, :5]
            self.top5 += int((top == best[:, None]).any(axis=1).sum())

    def merged(self, other: ErrorStats) -> ErrorStats:
        """The sums of two shards of the same tensor together (maxima taken)."""
        sums = {f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self)}
        sums.update(max_abs=max(self.max_abs, other.max_abs), classes=self.classes or other.classes)
        return ErrorStats(**sums)

    @property
    def sqnr_db(self) -> float:
        return float(sqnr_db(self.signal, self.noise))

    @property
    def cosine(self) -> float:
        denominator = np.sqrt(self.signal * self.other)
        return float(self.dot / denominator) if denominator else 1.0

    def as_dict(self) -> dict[str, float | None]:
        out: dict[str, float | None] = {
            "sqnr_db": self.sqnr_db,
            "cosine": self.cosine,
            "max_abs_error": self.max_abs,
        }
        if self.classes:
            out["top1_agreement"] = self.top1 / self.rows
            out["top5_agreement"] = self.top5 / self.rows
        return out


def sqnr_db(signal: float | np.ndarray, noise: float | np.ndarray) -> float | np.ndarray:
    """SQNR in dB from summed (or mean) squares of the signal and of the error, elementwise:
    10 log10(signal / noise), infinite where the error is exactly 0.

    >>> float(sqnr_db(100.0, 1.0)), float(sqnr_db(1.0, 0.0))
    (20.0, inf)
    """
    signal, noise = np.asarray(signal, np.float64), np.asarray(noise, np.float64)
    with np.errstate(divide="ignore"):
        ratio = np.maximum(signal, 1e-300) / noise
    return np.where(noise == 0, np.inf, 10 * np.log10(np.where(noise == 0, 1.0, ratio)))


def looks_like_scores(output: np.ndarray) -> bool:
    """A (batch, classes) float array with 2..100000 classes: logits or probabilities."""
    return output.ndim == 2 and 2 <= output.shape[1] <= 100_000 and output.dtype.kind == "f"
