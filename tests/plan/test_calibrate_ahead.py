"""Calibration runs ONNX Runtime on the next batch while the observers (and GPTQ's H, a job per
layer) take the current one: the same statistics as batch after batch, errors in sample
order."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

import qdq.plan.calibrate as calibrate_module
from qdq.data import Samples, model_inputs
from qdq.observers import make_observer
from qdq.onnx.graph import GraphIndex
from qdq.onnx.model import load_model
from qdq.passes.gptq import HessianSums, linear_layers

from conftest import DIGITS


def _one_at_a_time(runner, function, items):
    return map(function, items)


def _calibrated(batch_size: int) -> tuple:
    """Calibration's observers, means, channel means and GPTQ's H on the digits CNN."""
    model = load_model(DIGITS / "cnn.onnx")
    samples = Samples(DIGITS / "calib.npz", model_inputs(model))
    index = GraphIndex(model)
    layers = linear_layers(index, [n.name for n in model.graph.node])
    convs = [n.output[0] for n in model.graph.node if n.op_type == "Conv"]
    names = [model.graph.output[0].name, *convs]
    sums = HessianSums(index, layers, 24)
    found = calibrate_module.observe(
        model, samples, lambda _: make_observer("percentile"), names, batch_size, False,
        convs, channels=convs, limit=40, taps=[sums],
    )  # fmt: skip
    return *found, sums.found()


@pytest.mark.parametrize("batch_size", [1, 16])
def test_running_a_batch_ahead_gives_the_statistics_of_one_batch_at_a_time(batch_size, monkeypatch):
    ahead = _calibrated(batch_size)
    monkeypatch.setattr(calibrate_module, "_one_ahead", _one_at_a_time)
    alone = _calibrated(batch_size)
    (observers, unfit, means, channels, h), (observers_1, unfit_1, means_1, channels_1, h_1) = (
        ahead,
        alone,
    )
    assert h.keys() == h_1.keys()
    assert len(h) >= 2  # the CNN's layers, each its own job on the pool
    for name in h:
        np.testing.assert_array_equal(h[name], h_1[name])
    assert unfit == unfit_1
    assert observers.keys() == observers_1.keys()
    for name, observer in observers.items():
        histogram, histogram_1 = observer.histogram, observers_1[name].histogram
        assert np.array_equal(histogram.counts, histogram_1.counts)
        assert np.array_equal(histogram.width, histogram_1.width)
    assert means.keys() == means_1.keys()
    assert channels.keys() == channels_1.keys()
    for name in means:
        assert np.array_equal(means[name].mean, means_1[name].mean)
        assert np.array_equal(channels[name].values, channels_1[name].values)
        assert channels[name].values.shape[0] == 40  # the first 40 samples' means, no more


def test_the_next_batch_runs_while_the_caller_holds_this_one():
    started = threading.Event()

    def run(item: int) -> int:
        if item == 1:
            started.set()
        return item * 10

    with ThreadPoolExecutor(1) as runner:
        results = calibrate_module._one_ahead(runner, run, range(4))
        assert next(results) == 0
        assert started.wait(timeout=30)  # batch 1 ran before the caller asked for it
        assert list(results) == [10, 20, 30]


def test_an_error_in_a_later_batch_comes_after_the_batches_before_it():
    def run(item: int) -> int:
        if item == 2:
            raise ValueError("batch 2 holds NaN")
        return item

    with ThreadPoolExecutor(1) as runner:
        results = calibrate_module._one_ahead(runner, run, range(4))
        assert [next(results), next(results)] == [0, 1]
        with pytest.raises(ValueError, match="batch 2"):
            next(results)
