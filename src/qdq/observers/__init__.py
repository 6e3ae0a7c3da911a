"""Calibration observers: stream batches in constant memory, then propose a range.

`make_observer("kl", bits=8)` builds one by the method names the CLI uses.
"""

from __future__ import annotations

from collections.abc import Callable

from qdq.errors import SchemeError
from qdq.observers.auto import Auto
from qdq.observers.base import Observer
from qdq.observers.histogram import Histogram, HistogramObserver, RangeRule
from qdq.observers.kl import KL
from qdq.observers.minmax import MinMaxObserver, MovingAverageMinMaxObserver
from qdq.observers.mse import MSE
from qdq.observers.percentile import Percentile

_FACTORIES: dict[str, Callable[[int, int | None], Observer]] = {
    "minmax": lambda bits, axis: MinMaxObserver(axis=axis),
    "ema": lambda bits, axis: MovingAverageMinMaxObserver(axis=axis),
    "kl": lambda bits, axis: HistogramObserver(KL(bits), axis=axis),
    "percentile": lambda bits, axis: HistogramObserver(Percentile(), axis=axis),
    "mse": lambda bits, axis: HistogramObserver(MSE(bits), axis=axis),
    "auto": lambda bits, axis: HistogramObserver(Auto(bits), axis=axis),
}
METHODS = tuple(_FACTORIES)


def make_observer(method: str, bits: int = 8, axis: int | None = None) -> Observer:
    """A fresh observer for a calibration `method` (one of `METHODS`) with default settings."""
    try:
        factory = _FACTORIES[method]
    except KeyError:
        raise SchemeError(
            f"unknown calibration method {method!r}; choose one of {', '.join(METHODS)}"
        ) from None
    return factory(bits, axis)


__all__ = [
    "KL",
    "METHODS",
    "MSE",
    "Auto",
    "Histogram",
    "HistogramObserver",
    "MinMaxObserver",
    "MovingAverageMinMaxObserver",
    "Observer",
    "Percentile",
    "RangeRule",
    "make_observer",
]
