"""The observer protocol and the batch checks every observer shares."""

from __future__ import annotations

import numbers
from typing import Protocol, Self, runtime_checkable

import ml_dtypes
import numpy as np

from qdq.errors import DataError, ObserverStateError, expect
from qdq.qparams import Range


@runtime_checkable
class Observer(Protocol):
    """Streams batches into a summary of constant size, then proposes a range.

    `merge` combines calibration shards: `a.merge(b)` leaves `a` as if it had seen both streams.
    """

    axis: int | None

    def update(self, batch: np.ndarray) -> None: ...

    def merge(self, other: Self) -> None: ...

    def compute(self) -> Range: ...


def reduce_axes(batch: np.ndarray, axis: int | None) -> tuple[int, ...] | None:
    """Axes to reduce over: all (per-tensor) or all but `axis` (per-channel)."""
    if axis is None:
        return None
    return tuple(d for d in range(batch.ndim) if d != axis)


def checked_batch(batch: np.ndarray, axis: int | None, channels: int | None) -> np.ndarray:
    """`batch` as a float array after dtype, emptiness and channel-count checks.

    `axis` comes back normalized through the returned array's rank; `channels` is the channel
    count seen so far (None before the first batch).
    """
    expect(axis, (numbers.Integral, type(None)), "the per-channel axis")
    batch = np.asarray(batch)
    if batch.dtype.kind != "f" and batch.dtype != ml_dtypes.bfloat16:
        raise DataError(
            f"observers take float tensors, got dtype {batch.dtype}; "
            "pass the float activations or weights, not quantized codes"
        )
    if batch.size == 0:
        raise DataError(f"batch of shape {batch.shape} is empty; give at least one sample")
    if batch.dtype == ml_dtypes.bfloat16 or batch.dtype == np.float16:
        batch = batch.astype(np.float32)
    if axis is not None:
        if not -batch.ndim <= axis < batch.ndim:
            raise DataError(
                f"per-channel axis {axis} does not exist in a batch of shape {batch.shape}"
            )
        if channels is not None and batch.shape[axis] != channels:
            raise DataError(
                f"batch has {batch.shape[axis]} channels on axis {axis} but earlier batches had "
                f"{channels}; feed one tensor per observer"
            )
    return batch


def check_finite(lo: np.ndarray, hi: np.ndarray, batch: np.ndarray) -> None:
    """Raise if the batch held NaN or Inf; min/max already propagate them, so this is free."""
    if np.isfinite(lo).all() and np.isfinite(hi).all():
        return
    nan = int(np.isnan(batch).sum())
    inf = int(np.isinf(batch).sum())
    raise DataError(
        f"batch holds {nan} NaN and {inf} Inf of {batch.size} values; calibration needs finite "
        "data: check the inputs and the preprocessing, or exclude this tensor"
    )


def check_mergeable(mine: object, other: object, attrs: tuple[str, ...]) -> None:
    """Raise unless `other` is the same kind of observer with the same settings."""
    if type(mine) is not type(other):
        raise ObserverStateError(
            f"cannot merge a {type(other).__name__} into a {type(mine).__name__}"
        )
    for name in attrs:
        a, b = getattr(mine, name), getattr(other, name)
        if a != b:
            raise ObserverStateError(f"cannot merge observers with {name}={a!r} and {name}={b!r}")


def no_data_error(observer: object) -> ObserverStateError:
    return ObserverStateError(
        f"{type(observer).__name__} has seen no data; call update(batch) before compute()"
    )
