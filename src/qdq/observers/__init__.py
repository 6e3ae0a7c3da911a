"""Calibration observers: stream batches in constant memory, then propose a range.

`make_observer("kl", QScheme(8))` builds one by the method names the CLI uses, for the grid its
range will be used on.
"""

from __future__ import annotations

import enum
import numbers
from collections.abc import Callable

from qdq.errors import choice, expect
from qdq.observers.auto import Auto
from qdq.observers.base import Observer
from qdq.observers.histogram import Histogram, HistogramObserver, RangeRule
from qdq.observers.kl import KL
from qdq.observers.minmax import MinMaxObserver, MovingAverageMinMaxObserver
from qdq.observers.mse import MSE
from qdq.observers.percentile import Percentile
from qdq.scheme import QScheme


class Method(enum.StrEnum):
    """The calibration methods, by the names the CLI uses."""

    MINMAX = "minmax"
    EMA = "ema"
    KL = "kl"
    PERCENTILE = "percentile"
    MSE = "mse"
    AUTO = "auto"
    BEST = "best"  # every method's plan tried on the outputs' parts (qdq.plan.method)


METHODS = tuple(m.value for m in Method)
_FACTORIES: dict[Method, Callable[[QScheme, int | None], Observer]] = {
    Method.MINMAX: lambda grid, axis: MinMaxObserver(axis=axis),
    Method.EMA: lambda grid, axis: MovingAverageMinMaxObserver(axis=axis),
    Method.KL: lambda grid, axis: HistogramObserver(
        KL(grid.bits, symmetric=grid.symmetric), axis=axis
    ),
    Method.PERCENTILE: lambda grid, axis: HistogramObserver(Percentile(), axis=axis),
    Method.MSE: lambda grid, axis: HistogramObserver(MSE(grid.bits), axis=axis),
    Method.AUTO: lambda grid, axis: HistogramObserver(
        Auto(grid.bits, grid.symmetric, grid.narrow_range), axis=axis
    ),
    # The histogram gives every candidate's range; percentile's if the choice is skipped.
    Method.BEST: lambda grid, axis: HistogramObserver(Percentile(), axis=axis),
}
UINT8 = QScheme(bits=8, signed=False)


def make_observer(
    method: Method | str, scheme: QScheme = UINT8, axis: int | None = None
) -> Observer:
    """A fresh observer for a calibration `method` (one of `METHODS`) whose range will be used
    on `scheme`'s grid: its bits set KL's and MSE's target, and `auto` scores its candidates on
    that grid (symmetric or not)."""
    expect(scheme, QScheme, "the scheme", "e.g. qdq.QScheme(bits=8)")
    expect(axis, (numbers.Integral, type(None)), "the per-channel axis")
    return _FACTORIES[choice(Method, method, "calibration method")](scheme, axis)


__all__ = [
    "KL",
    "METHODS",
    "MSE",
    "Auto",
    "Histogram",
    "HistogramObserver",
    "Method",
    "MinMaxObserver",
    "MovingAverageMinMaxObserver",
    "Observer",
    "Percentile",
    "RangeRule",
    "make_observer",
]
