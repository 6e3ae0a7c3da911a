"""Running min/max and its moving average (docs/quantization.md, §9)."""

from __future__ import annotations

import numbers

import numpy as np

from qdq.errors import ObserverStateError, expect
from qdq.observers.base import (
    check_finite,
    check_mergeable,
    checked_batch,
    no_data_error,
    reduce_axes,
)
from qdq.qparams import Range


class MinMaxObserver:
    """Exact running min and max, per tensor or per channel (`axis`).

    >>> o = MinMaxObserver()
    >>> o.update(np.array([-1.0, 2.0])); o.update(np.array([3.0]))
    >>> float(o.compute().lo), float(o.compute().hi)
    (-1.0, 3.0)
    """

    def __init__(self, axis: int | None = None) -> None:
        self.axis = axis
        self.lo: np.ndarray | None = None
        self.hi: np.ndarray | None = None

    def update(self, batch: np.ndarray) -> None:
        lo, hi = _batch_min_max(batch, self.axis, self.lo)
        if self.lo is None:
            self.lo, self.hi = lo, hi
        else:
            self.lo, self.hi = np.minimum(self.lo, lo), np.maximum(self.hi, hi)

    def merge(self, other: MinMaxObserver) -> None:
        check_mergeable(self, other, ("axis",))
        if other.lo is None:
            return
        if self.lo is None:
            self.lo, self.hi = other.lo.copy(), other.hi.copy()
            return
        _check_same_shape(self.lo, other.lo)
        self.lo, self.hi = np.minimum(self.lo, other.lo), np.maximum(self.hi, other.hi)

    def compute(self) -> Range:
        if self.lo is None:
            raise no_data_error(self)
        return Range(self.lo, self.hi)


class MovingAverageMinMaxObserver:
    """Exponential moving average of batch min/max (torch.ao and ONNX Runtime), eq. 17.

    The first batch sets the range; each later one moves it by `c * (batch - running)`.
    `merge` averages the two shards' ranges weighted by their batch counts: a moving average
    depends on batch order, so no merge can equal one sequential pass exactly.
    """

    def __init__(self, averaging_constant: float = 0.01, axis: int | None = None) -> None:
        expect(averaging_constant, numbers.Real, "averaging_constant")
        if not 0.0 < averaging_constant <= 1.0:
            raise ObserverStateError(
                f"averaging_constant must be in (0, 1], got {averaging_constant}; 0.01 is typical"
            )
        self.averaging_constant = averaging_constant
        self.axis = axis
        self.lo: np.ndarray | None = None
        self.hi: np.ndarray | None = None
        self.batches = 0

    def update(self, batch: np.ndarray) -> None:
        lo, hi = _batch_min_max(batch, self.axis, self.lo)
        if self.lo is None:
            self.lo, self.hi = lo, hi
        else:
            c = self.averaging_constant
            self.lo = self.lo + c * (lo - self.lo)
            self.hi = self.hi + c * (hi - self.hi)
        self.batches += 1

    def merge(self, other: MovingAverageMinMaxObserver) -> None:
        check_mergeable(self, other, ("axis", "averaging_constant"))
        if other.lo is None:
            return
        if self.lo is None:
            self.lo, self.hi, self.batches = other.lo.copy(), other.hi.copy(), other.batches
            return
        _check_same_shape(self.lo, other.lo)
        total = self.batches + other.batches
        w = other.batches / total
        self.lo = self.lo + w * (other.lo - self.lo)
        self.hi = self.hi + w * (other.hi - self.hi)
        self.batches = total

    def compute(self) -> Range:
        if self.lo is None:
            raise no_data_error(self)
        return Range(self.lo, self.hi)


def _batch_min_max(
    batch: np.ndarray, axis: int | None, seen: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    channels = None if seen is None or axis is None else seen.shape[0]
    batch = checked_batch(batch, axis, channels)
    axes = reduce_axes(batch, None if axis is None else axis % batch.ndim)
    lo = np.min(batch, axis=axes).astype(np.float64)
    hi = np.max(batch, axis=axes).astype(np.float64)
    check_finite(lo, hi, batch)
    return lo, hi


def _check_same_shape(a: np.ndarray, b: np.ndarray) -> None:
    if a.shape != b.shape:
        raise ObserverStateError(
            f"cannot merge observers of {a.shape} and {b.shape} channels; "
            "merge shards of one tensor"
        )
