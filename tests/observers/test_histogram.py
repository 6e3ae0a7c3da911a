"""The histogram the clipping observers share: merging keeps mass and extremes, growth appends
or merges bins exactly, memory stays bounded (its compiled binning: test_histogram_kernel.py)."""

from __future__ import annotations

import numpy as np
import pytest

from qdq.observers.histogram import Histogram


def test_histogram_merge_preserves_mass_and_extremes():
    a, b = Histogram(), Histogram()
    a.update(np.array([-1.0, 0.0, 0.5], np.float32))
    b.update(np.array([7.0, -0.25], np.float32))
    a.merge(b)
    assert a.counts.sum() == pytest.approx(5.0)
    assert (float(a.lo[0]), float(a.hi[0])) == (-1.0, 7.0)


def test_histogram_growth_appends_bins_of_the_same_width():
    h = Histogram(bins=128)
    h.update(np.array([0.1, -0.9, 1.0], np.float32))
    before = h.magnitude()[0][0].copy()
    h.update(np.array([3.5], np.float32))  # 448 bins of width 1/128 reach 3.5: no re-binning
    assert h.width[0] == 1 / 128
    assert h.amax[0] >= 3.5
    after = h.magnitude()[0][0]
    assert after[:128].tolist() == before.tolist()
    assert after[447] == 1.0  # 3.5 * 128 = 448 bins: 3.5 itself is the edge, in the last bin


def test_histogram_growth_past_max_bins_merges_bins_exactly():
    h = Histogram(bins=128, max_bins=128)
    h.update(np.array([0.1, -0.9, 1.0], np.float32))
    before = h.magnitude()[0][0].copy()
    h.update(np.array([3.5], np.float32))  # amax 1 -> 4: groups of four bins merge
    assert h.amax[0] == 4.0
    after = h.magnitude()[0][0]
    assert after[:32].tolist() == before.reshape(32, 4).sum(axis=1).tolist()
    assert after[112] == 1.0  # 3.5 / (4 / 128)
    assert h.counts.shape == (1, 256)


def test_histogram_survives_a_jump_of_many_orders_of_magnitude():
    h = Histogram(bins=128, max_bins=1024)
    h.update(np.array([-1e-3, 1e-3], np.float32))
    h.update(np.array([1e20], np.float32))
    assert h.counts.sum() == 3
    assert h.amax[0] >= 1e20


def test_histogram_memory_is_bounded_by_max_bins():
    h = Histogram(bins=128, max_bins=1024)
    for scale in (1.0, 1e3, 1e6, 1e9):
        h.update(np.array([-scale, scale], np.float32))
    assert h.counts.shape == (1, 2048)
    assert h.counts.sum() == 8
