"""The compiled histogram kernel (Numba, the `fast` extra) counts exactly as the NumPy path."""

from __future__ import annotations

import numpy as np
import pytest

from qdq.errors import ObserverStateError
from qdq.observers import histogram

pytest.importorskip("numba")


@pytest.mark.parametrize(
    ("shape", "axis"),
    [
        ((4, 24, 9, 9), None),
        ((4, 24, 9, 9), 1),
        ((3, 5000), 1),
        ((7,), None),
        ((2, 3, 40001), 1),  # long rows: counted in four copies (`LANES`), an odd count left
        ((16, 32, 80), None),
    ],
)
def test_compiled_and_numpy_binning_give_the_same_counts(shape, axis, monkeypatch):
    rng = np.random.default_rng(0)
    batch = (rng.standard_normal(shape) * rng.uniform(0.01, 10, shape[-1])).astype(np.float32)
    rows = histogram._as_rows(batch, axis).copy()
    absmax = np.abs(rows).max(axis=1).astype(np.float64)
    rows[-1, :3] = [absmax[-1], -absmax[-1], 0.0]  # both ends and the centre exactly
    if len(rows) > 1:
        rows[0] = 0.0  # only zeros: width 0
        absmax[0] = 0.0
    width = absmax / 2048
    compiled = histogram._bin_rows(rows, width, 2048)
    assert histogram._compiled_count() is not None
    monkeypatch.setattr(histogram, "_compiled_count", lambda: None)
    reference = histogram._bin_rows(rows, width, 2048)
    np.testing.assert_array_equal(compiled, reference)
    assert compiled.sum() == rows.size


def test_a_range_that_does_not_cover_the_values_is_an_error_not_a_stray_write():
    # the loops index the counts unchecked: values past the bins must never reach them
    rows = np.array([[-3.0, 0.5, 1.0]], np.float32)
    with pytest.raises(ObserverStateError, match="does not cover values from -3"):
        histogram._bin_rows(rows, np.array([1.0 / 2048]), 2048)
    counts = histogram._bin_rows(rows, np.array([3.0 / 2048]), 2048)  # covered: counted
    assert counts.sum() == 3
