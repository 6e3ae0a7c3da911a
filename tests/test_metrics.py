"""Streaming error metrics: golden values and batch-independence."""

from __future__ import annotations

import numpy as np
import pytest

from qdq.metrics import ErrorStats, looks_like_scores


def test_sqnr_cosine_and_max_error_golden():
    # signal 3^2 + 4^2 = 25, noise 0.5^2 = 0.25: SQNR = 10 log10(100) = 20 dB
    stats = ErrorStats()
    stats.update(np.array([3.0, 4.0]), np.array([3.0, 4.5]))
    assert stats.sqnr_db == pytest.approx(20.0)
    assert stats.max_abs == pytest.approx(0.5)
    assert stats.cosine == pytest.approx((9 + 18) / np.sqrt(25 * (9 + 20.25)))


def test_batches_accumulate_like_one_pass():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((40, 10)).astype(np.float32)
    y = x + rng.normal(0, 0.01, x.shape).astype(np.float32)
    whole, parts = ErrorStats(), ErrorStats()
    whole.update(x, y)
    for i in range(0, 40, 7):
        parts.update(x[i : i + 7], y[i : i + 7])
    assert parts.as_dict() == pytest.approx(whole.as_dict())


def test_an_integer_output_counts_the_values_equal_to_fp32s():
    """A label's SQNR weighs a wrong class by the distance between two class numbers."""
    labels = np.array([3, 7, 7, 1, 0, 9], np.int64)
    got = np.array([3, 7, 2, 1, 0, 8], np.int64)
    first, second = ErrorStats(), ErrorStats()
    first.update(labels[:4], got[:4], block=2)
    second.update(labels[4:], got[4:])
    merged = first.merged(second)
    assert merged.as_dict()["equal_share"] == pytest.approx(4 / 6)
    assert merged.values == 6
    assert "equal_share" not in ErrorStats().as_dict()


def test_top1_and_top5_agreement_for_class_scores():
    reference = np.eye(6, dtype=np.float32)  # class i wins row i
    approximation = reference.copy()
    approximation[0] = [0.5, 0.9, 0.1, 0.1, 0.1, 0.1]  # top-1 now 1, class 0 still in top 5
    stats = ErrorStats()
    stats.update(reference, approximation)
    assert stats.as_dict()["top1_agreement"] == pytest.approx(5 / 6)
    assert stats.as_dict()["top5_agreement"] == 1.0
    assert looks_like_scores(reference)
    assert not looks_like_scores(np.zeros((2, 3, 4), np.float32))


def test_an_infinite_value_kept_exactly_adds_no_error():
    """inf - inf is NaN: where FP32 and the quantized model agree on an infinity (a masked
    logit kept as -inf), that element is exact, and the rest is measured as without it."""
    x = np.array([3.0, -np.inf, 4.0, np.inf])
    y = np.array([3.0, -np.inf, 4.5, np.inf])
    kept, finite = ErrorStats(), ErrorStats()
    kept.update(x, y)
    finite.update(x[[0, 2]], y[[0, 2]])
    assert kept.noise == finite.noise == pytest.approx(0.25)
    assert kept.max_abs == pytest.approx(0.5)
    lost = ErrorStats()
    lost.update(x, np.array([3.0, 0.0, 4.5, np.inf]))  # an infinity not kept is an error
    assert lost.noise == np.inf
