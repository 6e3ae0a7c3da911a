"""The range method's choice (`qdq.plan.method.choose_method`): percentile stays unless another
method leads it by MARGIN on the median and on MAJORITY of the held samples, and a method that
can no longer win is scored no further."""

from __future__ import annotations

import numpy as np
import pytest

from qdq.plan.method import MAJORITY, ROW_BLOCK, _row_powers, choose_method


@pytest.mark.parametrize(
    ("minmax", "chosen"), [(10.4, "percentile"), (10.6, "minmax"), (9.0, "percentile")]
)
def test_a_method_replaces_percentile_only_by_more_than_the_margin(minmax, chosen):
    # percentile 10.0 dB; MARGIN 0.5 dB: minmax must score over 10.5.
    scores = {"percentile": 10.0, "minmax": minmax, "mse": 8.0}
    same = lambda value: value  # noqa: E731 - plans and models are the method names here
    picked, seen, above, _ = choose_method(
        {m: m for m in scores}, same, same, lambda m, _, s=scores: s[m]
    )
    assert (picked, seen) == (chosen, scores)
    assert above == {"percentile": 0.0, "minmax": float(minmax > 10.0), "mse": 0.0}


def test_the_choice_is_not_carried_by_a_few_samples():
    # Per held sample (dB): percentile 10 on each of 9.
    percentile = np.full(9, 10.0)
    outlier = np.array([40.0] + [9.6] * 8)  # one sample carries a mean/pooled lead: no
    split = np.array([11.0] * 5 + [9.0] * 4)  # median leads by 1 dB, above on 5 of 9 only: no
    clear = np.array([11.0] * 7 + [9.5] * 2)  # median leads, above on 7 of 9 (>= MAJORITY): yes
    assert 5 / 9 < MAJORITY <= 7 / 9
    same = lambda value: value  # noqa: E731 - plans and models are the method names here
    for other, chosen in [(outlier, "percentile"), (split, "percentile"), (clear, "mse")]:
        scores = {"percentile": percentile, "mse": other}
        picked, medians, above, _ = choose_method(
            {m: m for m in scores}, same, same, lambda m, _, s=scores: s[m]
        )
        assert picked == chosen
        assert medians == {m: float(np.median(v)) for m, v in scores.items()}
        assert above["mse"] == pytest.approx(float(np.mean(other > percentile)))


def test_a_method_that_can_no_longer_win_is_scored_no_further():
    """Percentile on 9 held samples; MAJORITY (2/3) needs 6 above it: a method below it on 4
    is out after those 4, one above it throughout runs to the end, and the choice is the one
    full scoring makes."""
    percentile = np.full(9, 10.0)
    losing, winning = np.array([9.0] * 9), np.array([11.0] * 9)
    scored: dict[str, int] = {}

    def one_at_a_time(method: str, until) -> np.ndarray:
        values = {"percentile": percentile, "minmax": losing, "mse": winning}[method]
        for n in range(1, 10):
            if until is not None and until(values[:n]):
                break
        scored[method] = n
        return values[:n]

    same = lambda value: value  # noqa: E731 - plans and models are the method names here
    methods = {m: m for m in ("percentile", "minmax", "mse")}
    picked, medians, above, counts = choose_method(methods, same, same, one_at_a_time)
    assert picked == "mse"
    assert counts == scored == {"percentile": 9, "minmax": 4, "mse": 9}
    assert medians["minmax"] == 9.0
    assert above["minmax"] == 0.0


def test_per_sample_powers_are_summed_over_every_block_of_a_row():
    """A check's per-sample SQNR sums its rows a block at a time (PP-OCRv6's 16 lines of 40 x
    18710 scores): the sums over rows of several blocks, a shared infinity in a later block
    counted as no error and one of the candidate's own as an infinite error."""
    rng = np.random.default_rng(0)
    want = rng.normal(size=(3, 2 * ROW_BLOCK + 5)).astype(np.float32)
    have = want + rng.normal(0, 1e-2, want.shape).astype(np.float32)
    want[1, ROW_BLOCK + 3] = have[1, ROW_BLOCK + 3] = np.inf
    have[2, 2 * ROW_BLOCK + 1] = np.inf
    signal, noise = _row_powers(want, have)
    x, y = want.astype(np.float64), have.astype(np.float64)
    np.testing.assert_allclose(signal[0], (x[0] ** 2).sum(), rtol=1e-12)
    np.testing.assert_allclose(noise[0], ((x[0] - y[0]) ** 2).sum(), rtol=1e-12)
    kept = np.isfinite(x[1])
    np.testing.assert_allclose(noise[1], ((x[1] - y[1])[kept] ** 2).sum(), rtol=1e-12)
    assert signal[1] == np.inf
    assert noise[2] == np.inf


def test_a_nan_sample_counts_as_the_worst_score():
    """Percentile's plan gives NaN on one held sample: that sample is its worst, and a method
    ahead on every sample replaces it (a NaN median had kept it against any other)."""
    scores = {"percentile": np.array([np.nan] + [20.0] * 8), "minmax": np.full(9, 40.0)}
    same = lambda value: value  # noqa: E731 - plans and models are the method names here
    picked, medians, _, _ = choose_method(
        {m: m for m in scores}, same, same, lambda m, _, s=scores: s[m]
    )
    assert (picked, medians["percentile"]) == ("minmax", 20.0)
