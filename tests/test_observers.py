"""Observers: golden ranges, merge == sequential, constant memory, torch.ao parity, bad input."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from qdq import (
    KL,
    METHODS,
    MSE,
    DataError,
    HistogramObserver,
    MinMaxObserver,
    MovingAverageMinMaxObserver,
    ObserverStateError,
    Percentile,
    QScheme,
    SchemeError,
    choose_qparams,
    fake_quantize,
    make_observer,
)
from qdq.observers.histogram import Histogram
from qdq.observers.kl import kl_end_bins

from conftest import float_arrays


def sqnr_db(x: np.ndarray, y: np.ndarray) -> float:
    return float(10 * np.log10(np.sum(x.astype(np.float64) ** 2) / np.sum((x - y) ** 2.0)))


def int8_sqnr(method: str, x: np.ndarray) -> float:
    observer = make_observer(method)
    for batch in np.array_split(x, 10):
        observer.update(batch)
    qparams = choose_qparams(observer.compute(), QScheme(symmetric=True))
    return sqnr_db(x, fake_quantize(x, qparams))


# ---- golden ----


def test_minmax_golden():
    o = MinMaxObserver()
    o.update(np.array([[-1.0, 2.0]], np.float32))
    o.update(np.array([[0.5, 3.0]], np.float32))
    r = o.compute()
    assert (float(r.lo), float(r.hi)) == (-1.0, 3.0)


def test_per_channel_minmax_golden():
    o = MinMaxObserver(axis=1)
    o.update(np.array([[-1.0, 2.0], [4.0, -3.0]], np.float32))
    r = o.compute()
    assert r.lo.tolist() == [-1.0, -3.0]
    assert r.hi.tolist() == [4.0, 2.0]


def test_moving_average_golden():
    # first batch sets [-1, 1]; second: lo = -1 + 0.5 * (-3 - -1) = -2, hi = 1 + 0.5 * (5 - 1) = 3
    o = MovingAverageMinMaxObserver(averaging_constant=0.5)
    o.update(np.array([-1.0, 1.0], np.float32))
    o.update(np.array([-3.0, 5.0], np.float32))
    r = o.compute()
    assert (float(r.lo), float(r.hi)) == (-2.0, 3.0)


def test_percentile_golden_on_a_uniform_ramp():
    x = np.arange(-5000, 5001, dtype=np.float32) / 5000  # 10001 values evenly over [-1, 1]
    o = HistogramObserver(Percentile(99.0))  # cuts 0.5 % from each tail
    o.update(x)
    r = o.compute()
    assert float(r.lo) == pytest.approx(-0.99, abs=2e-3)
    assert float(r.hi) == pytest.approx(0.99, abs=2e-3)
    sym = HistogramObserver(Percentile(99.0, symmetric=True))  # 1 % of |x| cut
    sym.update(x)
    assert float(sym.compute().hi) == pytest.approx(0.99, abs=2e-3)


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_percentile_on_one_side_of_zero_holds_the_percentile(sign):
    """A ReLU's output: the range holds zero anyway, so the whole 1 % comes off the far tail
    (cutting half at zero had kept 99.5 %, ranges wider than ONNX Runtime's)."""
    x = sign * np.arange(0, 10001, dtype=np.float32) / 10000  # evenly over [0, 1] (or [-1, 0])
    o = HistogramObserver(Percentile(99.0))
    o.update(x)
    r = o.compute()
    far = r.hi if sign > 0 else r.lo
    assert float(far) == pytest.approx(sign * 0.99, abs=2e-3)


def test_non_negative_data_gives_ranges_from_zero():
    x = np.abs(np.random.default_rng(0).standard_normal(10000)).astype(np.float32)
    for method in METHODS:
        o = make_observer(method)
        o.update(x)
        assert float(o.compute().lo) >= 0.0, method


@pytest.mark.parametrize("value", [1e-37, 1e-42])
def test_values_near_float32s_smallest_are_binned_inside_the_histogram(value):
    """Bins narrower than 3e-39 had made the binning's 1 / width inf, and the compiled loop
    wrote outside its counts (the process aborted on a corrupted heap)."""
    x = np.full((8, 16), value, np.float32)
    x[0, :4] = [0.0, -value, value / 2, 0.0]
    for method in METHODS:
        o = make_observer(method)
        o.update(x)
        o.update(x * 0.5)
        r = o.compute()
        assert np.isfinite([r.lo, r.hi]).all(), method
        assert float(r.lo) <= 0.0 <= float(r.hi), method
        assert float(r.hi) <= float(np.float32(value)), method


# ---- KL against a loop-by-loop transcription of TensorRT's public reference ----


def reference_kl_end_bin(hist: np.ndarray, levels: int, start: int = 128) -> int:
    bins = hist.astype(np.float64).copy()
    bins[0] = bins[1]
    divergences = []
    for i in range(start, len(bins) + 1):
        reference = bins[:i].copy()
        reference[i - 1] += bins[i:].sum()
        group = [j * levels // i for j in range(i)]
        candidate = np.zeros(i)
        for g in set(group):
            members = [j for j in range(i) if group[j] == g and bins[j] > 0]
            for j in members:
                candidate[j] = sum(bins[k] for k in members) / len(members)
        p = reference / reference.sum()
        q = candidate / candidate.sum()
        with np.errstate(divide="ignore"):
            divergences.append(sum(p[k] * np.log(p[k] / q[k]) for k in range(i) if p[k] > 0))
    d = np.array(divergences)
    return start + len(d) - 1 - int(np.argmin(d[::-1]))


@pytest.mark.parametrize("levels", [128, 256])
@pytest.mark.parametrize("seed", [0, 1])
def test_kl_matches_a_transcription_of_tensorrt(levels, seed):
    rng = np.random.default_rng(seed)
    data = np.abs(rng.laplace(size=20000))
    hist = np.histogram(data, bins=400, range=(0, data.max()))[0].astype(np.float64)
    damped = hist.copy()
    damped[0] = damped[1]
    assert int(kl_end_bins(damped[None], levels)[0]) == reference_kl_end_bin(hist, levels)


# ---- the point of calibration: outliers ----


def test_clipping_methods_beat_minmax_on_outliers_and_match_it_on_uniform_data():
    rng = np.random.default_rng(0)
    laplace = rng.laplace(size=1_000_000).astype(np.float32)
    laplace[rng.choice(laplace.size, 2, replace=False)] = [200.0, -200.0]  # rare, large outliers
    uniform = rng.uniform(-1, 1, size=1_000_000).astype(np.float32)
    minmax_laplace = int8_sqnr("minmax", laplace)
    minmax_uniform = int8_sqnr("minmax", uniform)
    for method in ("kl", "percentile", "mse"):
        assert int8_sqnr(method, laplace) > minmax_laplace + 3.0, method
        assert int8_sqnr(method, uniform) > minmax_uniform - 0.5, method


# ---- merge == sequential ----


@given(st.lists(float_arrays(), min_size=2, max_size=6), st.integers(1, 5))
def test_minmax_merge_equals_one_observer_fed_both_streams(batches, cut):
    cut = min(cut, len(batches) - 1)
    whole, left, right = MinMaxObserver(), MinMaxObserver(), MinMaxObserver()
    for b in batches:
        whole.update(b)
    for b in batches[:cut]:
        left.update(b)
    for b in batches[cut:]:
        right.update(b)
    left.merge(right)
    assert (left.compute().lo, left.compute().hi) == (whole.compute().lo, whole.compute().hi)


def _sequential_and_merged(method: str) -> tuple[HistogramObserver, HistogramObserver, np.ndarray]:
    rng = np.random.default_rng(1)
    shards = [rng.standard_normal(50000).astype(np.float32) * s for s in (1.0, 3.0, 0.5, 2.0)]
    whole = make_observer(method)
    for s in shards:
        whole.update(s)
    parts = [make_observer(method) for _ in shards]
    for part, s in zip(parts, shards, strict=True):
        part.update(s)
    for part in parts[1:]:
        parts[0].merge(part)
    return whole, parts[0], np.concatenate(shards)


@pytest.mark.parametrize("method", ["percentile", "mse"])
def test_histogram_merge_is_within_one_bin_of_sequential(method):
    whole, merged, _ = _sequential_and_merged(method)
    assert merged.histogram.counts.sum() == pytest.approx(whole.histogram.counts.sum())
    coarser = max(whole.histogram.width[0], merged.histogram.width[0])
    a, b = merged.compute(), whole.compute()
    assert abs(float(a.hi) - float(b.hi)) <= coarser
    assert abs(float(a.lo) - float(b.lo)) <= coarser


def test_kl_of_merged_shards_quantizes_as_well_as_sequential():
    # KL's argmin sits on a flat objective, so its threshold moves with the grid; what it is
    # for, the quantization error, must not.
    whole, merged, data = _sequential_and_merged("kl")
    scheme = QScheme(symmetric=True)
    sqnr = [
        sqnr_db(data, fake_quantize(data, choose_qparams(o.compute(), scheme)))
        for o in (whole, merged)
    ]
    assert abs(sqnr[0] - sqnr[1]) < 0.5


def test_ema_merge_weights_shards_by_batch_count():
    a, b = MovingAverageMinMaxObserver(), MovingAverageMinMaxObserver()
    a.update(np.array([-1.0, 1.0], np.float32))
    for _ in range(3):
        b.update(np.array([-5.0, 5.0], np.float32))
    a.merge(b)  # one batch at [-1, 1], three at [-5, 5]: (1 * 1 + 3 * 5) / 4 = 4
    assert float(a.compute().hi) == pytest.approx(4.0)


# ---- parity with torch.ao ----


def test_moving_average_matches_torch_ao_observer():
    torch = pytest.importorskip("torch")
    from torch.ao.quantization.observer import MovingAverageMinMaxObserver as TorchEMA

    rng = np.random.default_rng(0)
    ours, ref = MovingAverageMinMaxObserver(), TorchEMA(averaging_constant=0.01)
    for i in range(50):
        batch = (rng.standard_normal((8, 16)) * (1 + i % 7) + i % 3).astype(np.float32)
        ours.update(batch)
        ref(torch.from_numpy(batch))
    r = ours.compute()
    assert float(r.lo) == pytest.approx(ref.min_val.item(), rel=1e-6)
    assert float(r.hi) == pytest.approx(ref.max_val.item(), rel=1e-6)


def test_per_channel_moving_average_matches_torch_ao():
    torch = pytest.importorskip("torch")
    from torch.ao.quantization.observer import (
        MovingAveragePerChannelMinMaxObserver as TorchEMA,
    )

    rng = np.random.default_rng(1)
    ours, ref = MovingAverageMinMaxObserver(axis=1), TorchEMA(ch_axis=1)
    for _ in range(20):
        batch = rng.standard_normal((4, 3, 5)).astype(np.float32)
        ours.update(batch)
        ref(torch.from_numpy(batch))
    np.testing.assert_allclose(ours.compute().lo, ref.min_val.numpy(), rtol=1e-6)
    np.testing.assert_allclose(ours.compute().hi, ref.max_val.numpy(), rtol=1e-6)


# ---- per channel == per tensor on each slice ----


@pytest.mark.parametrize("method", METHODS)
def test_per_channel_equals_per_tensor_on_each_slice(method):
    rng = np.random.default_rng(2)
    w = rng.laplace(size=(3, 4000)).astype(np.float32) * np.array([[0.1], [1.0], [10.0]])
    per_channel = make_observer(method, axis=0)
    per_channel.update(w)
    r = per_channel.compute()
    for c in range(3):
        single = make_observer(method)
        single.update(w[c])
        assert float(r.lo[c]) == pytest.approx(float(single.compute().lo), rel=1e-9, abs=1e-12)
        assert float(r.hi[c]) == pytest.approx(float(single.compute().hi), rel=1e-9, abs=1e-12)


# ---- constant memory ----


@pytest.mark.parametrize("method", METHODS)
def test_memory_does_not_grow_with_batches(method):
    rng = np.random.default_rng(3)
    batches = [rng.standard_normal(4096).astype(np.float32) * (1 + i % 5) for i in range(8)]
    observer = make_observer(method)

    def held_after(n: int) -> int:
        tracemalloc.start()
        for i in range(n):
            observer.update(batches[i % len(batches)])
        held = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
        return held

    held_after(10)
    assert held_after(400) <= held_after(10) + 4096


# ---- bad input ----


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(
    ("batch", "message"),
    [
        (np.array([1.0, np.nan], np.float32), "1 NaN"),
        (np.array([1.0, np.inf, -np.inf], np.float32), "2 Inf"),
        (np.array([1, 2], np.int8), "float tensors"),
        (np.zeros((0, 3), np.float32), "empty"),
    ],
)
def test_bad_batches_raise_data_errors(method, batch, message):
    with pytest.raises(DataError, match=message):
        make_observer(method).update(batch)


@pytest.mark.parametrize("method", METHODS)
def test_range_before_data_is_a_state_error(method):
    with pytest.raises(ObserverStateError, match="update"):
        make_observer(method).compute()


@pytest.mark.parametrize("method", METHODS)
def test_channel_count_must_stay_the_same(method):
    o = make_observer(method, axis=0)
    o.update(np.ones((3, 4), np.float32))
    with pytest.raises(DataError, match="4 channels"):
        o.update(np.ones((4, 4), np.float32))


def test_merging_different_observers_is_refused():
    with pytest.raises(ObserverStateError, match="MinMaxObserver"):
        HistogramObserver(KL()).merge(MinMaxObserver())
    with pytest.raises(ObserverStateError, match="rule"):
        HistogramObserver(KL()).merge(HistogramObserver(MSE()))


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: KL(bits=16), "percentile or mse"),
        (lambda: Percentile(120.0), "99.99"),
        (lambda: make_observer("entropy2"), "minmax"),
        (lambda: Histogram(bins=1000), "power of two"),
        (lambda: MovingAverageMinMaxObserver(averaging_constant=0.0), "0.01"),
    ],
)
def test_bad_settings_are_refused_with_a_fix(build, message):
    with pytest.raises((SchemeError, ObserverStateError), match=message):
        build()


def test_auto_picks_the_best_estimator_per_tensor():
    rng = np.random.default_rng(4)
    laplace = rng.laplace(size=200_000).astype(np.float32)
    laplace[:2] = [150.0, -150.0]
    uniform = rng.uniform(-1, 1, size=200_000).astype(np.float32)
    for data in (laplace, uniform):
        scores = {m: int8_sqnr(m, data) for m in ("minmax", "percentile", "kl", "mse")}
        assert int8_sqnr("auto", data) >= max(scores.values()) - 0.2


def test_per_channel_kl_is_each_channels_own_kl():
    """Each channel a per-tensor problem on its slice (docs/quantization.md §5): the channels
    had shared the search's last bin, so a narrower channel was scored on bins past its own
    values and kept its max |x| (4.36 where its own KL is 4.02)."""
    rng = np.random.default_rng(5)
    first = np.stack([rng.standard_normal(20000), rng.standard_normal(20000)])
    second = np.stack([rng.standard_normal(20000), 1.6 * rng.standard_normal(20000)])
    both = HistogramObserver(KL(8), axis=0)
    for batch in (first, second):
        both.update(batch.astype(np.float32))
    whole = both.compute()
    for channel in range(2):
        alone = HistogramObserver(KL(8))
        for batch in (first, second):
            alone.update(batch[channel].astype(np.float32))
        assert whole.hi[channel] == pytest.approx(float(alone.compute().hi), rel=1e-6)


def test_kl_on_a_symmetric_grid_gives_data_above_zero_half_the_levels():
    """ReLU outputs on TensorRT's symmetric int8 have 128 levels, not uint8's 256."""
    data = np.abs(np.random.default_rng(1).laplace(0, 1, 50_000)).astype(np.float32)
    thresholds = {}
    for name, rule in (("int8", KL(8, symmetric=True)), ("7 bits", KL(7)), ("uint8", KL(8))):
        observer = HistogramObserver(rule)
        observer.update(data)
        thresholds[name] = float(observer.compute().hi)
    assert thresholds["int8"] == thresholds["7 bits"] < thresholds["uint8"]
