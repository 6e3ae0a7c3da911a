"""KL, MSE and percentile ranges where a review found them off: data on the negative side of
zero, a percentile of a whole number of values, and a tensor whose first batch is float64
subnormals."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from qdq.observers import KL, MSE, HistogramObserver, Percentile
from qdq.qparams import Range


def observed(rule, *batches: np.ndarray) -> Range:
    observer = HistogramObserver(rule)
    for batch in batches:
        observer.update(batch)
    return observer.compute()


@pytest.mark.parametrize("rule", [KL(8), KL(4), MSE(8), MSE(4)], ids=repr)
def test_data_below_zero_gets_the_mirror_of_data_above(rule):
    """A LogSoftmax's output (<= 0) had been treated as two-sided: half its codes unused."""
    x = -np.log(np.random.default_rng(0).dirichlet(np.ones(50), 400)).astype(np.float32)
    above, below = observed(rule, x), observed(rule, -x)
    assert float(above.lo) == 0.0
    assert float(below.hi) == 0.0
    assert float(below.lo) == pytest.approx(-float(above.hi))


@pytest.mark.parametrize(("symmetric", "count"), [(True, 1000), (False, 2000)])
def test_a_percentile_of_whole_values_leaves_the_outlier_out(symmetric, count):
    """99.9% of 1000 values is 999 of them (of 2000, a tail of one value each side); float
    rounding made it 999.0000000000001 and the range had reached the outlier's bin (99.95
    for values under 3.5)."""
    x = np.random.default_rng(2).standard_normal(count)
    x[np.argmax(x)] = 100.0
    kept = np.sort(x)[-2]
    for sign in (1, -1):
        rng = observed(Percentile(99.9, symmetric=symmetric), sign * x)
        end = float(rng.hi) if sign > 0 else -float(rng.lo)
        assert kept <= end < kept + 0.1


def test_float64_subnormals_then_normal_values_give_a_range():
    """The first batch's bins of width 5e-324 could not count how many the next one needed
    (an OverflowError); the subnormals are zeros at the new scale."""
    for rule in (Percentile(), KL(), MSE()):
        with warnings.catch_warnings():  # nor a numpy warning for all-zero batches first
            warnings.simplefilter("error")
            observed(rule, np.zeros(4), np.zeros(4), np.array([1.0, -1.0]))
        rng = observed(rule, np.array([1e-320, -1e-320]), np.array([1.0, -1.0, 0.5]))
        assert 0.5 <= float(rng.hi) <= 1.0
        assert -1.0 <= float(rng.lo) < 0
