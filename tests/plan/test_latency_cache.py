"""The latency cache: a group of graphs timed together is kept under the structures that set
its time, shared by runs at once, bounded, and never trusted past what it can hold."""

from __future__ import annotations

import json
import multiprocessing
from collections.abc import Callable

import numpy as np
import onnx
import pytest

from qdq.plan import latency_cache
from qdq.plan.latency_cache import latencies_ms

from conftest import DIGITS


def test_latencies_are_cached_per_group_of_graph_structures(tmp_path, monkeypatch):
    monkeypatch.setenv("QDQ_CACHE_DIR", str(tmp_path))
    model = onnx.load(DIGITS / "cnn.onnx")
    feed = {"input": np.load(DIGITS / "calib.npz")["input"][:1]}
    first = latencies_ms([model], feed)
    assert (tmp_path / "latency.json").exists()

    def timed_again(*_: object) -> list[float]:
        raise AssertionError("timed again")

    monkeypatch.setattr(latency_cache, "median_latency_ms", timed_again)
    model.graph.initializer[0].raw_data = bytes(len(model.graph.initializer[0].raw_data))
    assert latencies_ms([model], feed) == first  # other weights, same graph: same latency
    with pytest.raises(AssertionError, match="timed again"):  # a group's times: one moment's
        latencies_ms([model, onnx.load(DIGITS / "mobilenet.onnx")], feed)
    wider = onnx.load(DIGITS / "cnn.onnx")
    wider.graph.initializer[0].dims[0] += 1  # a wider layer: another model's latency
    with pytest.raises(AssertionError, match="timed again"):
        latencies_ms([wider], feed)
    model.graph.node[0].name = "renamed"  # names are not structure
    assert latencies_ms([model], feed) == first
    model.graph.node[0].op_type = "ConvInteger"  # an op is
    with pytest.raises(AssertionError, match="timed again"):
        latencies_ms([model], feed)
    monkeypatch.setenv("QDQ_CACHE_DIR", "")  # no cache
    with pytest.raises(AssertionError, match="timed again"):
        latencies_ms([onnx.load(DIGITS / "cnn.onnx")], feed)


def test_runs_at_once_share_the_cache_and_keep_each_others_times(tmp_path, monkeypatch):
    """Timing takes seconds; a benchmark's draws or quantize_many's workers time at once."""
    monkeypatch.setenv("QDQ_CACHE_DIR", str(tmp_path))
    cache = tmp_path / "latency.json"
    model = onnx.load(DIGITS / "cnn.onnx")
    feed = {"input": np.load(DIGITS / "calib.npz")["input"][:1]}

    def meanwhile(table: dict[str, list[float]]) -> Callable[..., list[float]]:
        def timed(*_: object) -> list[float]:
            cache.write_text(json.dumps(table))  # another run writes while this one times
            return [9.0]

        return timed

    monkeypatch.setattr(latency_cache, "median_latency_ms", meanwhile({"other": [1.0]}))
    assert latencies_ms([model], feed) == [9.0]
    table = json.loads(cache.read_text())
    assert table.pop("other") == [1.0]  # the other run's group is kept
    (key,) = table
    cache.unlink()
    monkeypatch.setattr(latency_cache, "median_latency_ms", meanwhile({key: [5.0]}))
    assert latencies_ms([model], feed) == [5.0]  # the first written is every run's
    assert json.loads(cache.read_text()) == {key: [5.0]}


def _resized(scale: float) -> onnx.ModelProto:
    """x[1, 2, 8, 8] -> Resize by `scale` -> GlobalAveragePool: the output shape is one."""
    scales = onnx.numpy_helper.from_array(np.array([1, 1, scale, scale], np.float32), "s")
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Resize", ["x", "", "s"], ["r"], mode="linear"),
         onnx.helper.make_node("GlobalAveragePool", ["r"], ["y"])],
        "resized",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 2, 8, 8])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 2, 1, 1])],
        [scales],
    )  # fmt: skip
    return onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])


def test_the_cache_keys_the_constants_that_size_the_work(tmp_path, monkeypatch):
    """A x4 Resize does 16x the work of a x1 one in the same graph: it had taken the first
    model's times from the cache (12x off)."""
    monkeypatch.setenv("QDQ_CACHE_DIR", str(tmp_path))
    times = iter([[1.0], [16.0]])
    monkeypatch.setattr(latency_cache, "median_latency_ms", lambda *_: next(times))
    feed = {"x": np.zeros((1, 2, 8, 8), np.float32)}
    assert latencies_ms([_resized(1.0)], feed) == [1.0]
    assert latencies_ms([_resized(4.0)], feed) == [16.0]
    assert len(json.loads((tmp_path / "latency.json").read_text())) == 2


def test_cached_times_that_are_no_times_are_timed_again(tmp_path, monkeypatch):
    """Zero, NaN or negative (no run of qdq writes them) had turned the planning off for the
    model; a file nested too deep for JSON, for every model."""
    monkeypatch.setenv("QDQ_CACHE_DIR", str(tmp_path))
    feed = {"x": np.zeros((1, 2, 8, 8), np.float32)}
    monkeypatch.setattr(latency_cache, "median_latency_ms", lambda *_: [2.0])
    latencies_ms([_resized(1.0)], feed)
    cache = tmp_path / "latency.json"
    (key,) = json.loads(cache.read_text())
    for bad in ("[0.0]", "[NaN]", "[-1.0]"):
        cache.write_text(f'{{"{key}": {bad}}}')
        assert latencies_ms([_resized(1.0)], feed) == [2.0]
    cache.write_text("[" * 100_000)
    assert latencies_ms([_resized(1.0)], feed) == [2.0]


def _writes(first: int) -> None:
    """Ten groups timed and written, as one run of many at once does."""
    feed = {"x": np.zeros((1, 2, 8, 8), np.float32)}
    for scale in range(first, first + 10):
        latencies_ms([_resized(float(scale))], feed)


def test_runs_writing_at_once_keep_every_group_and_the_newest_only(tmp_path, monkeypatch):
    """Each run replaced the file with what it had read before the others wrote (116 of 240
    groups kept); and the file is bounded, the oldest groups dropped first."""
    monkeypatch.setenv("QDQ_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(latency_cache, "median_latency_ms", lambda *_: [1.0])
    context = multiprocessing.get_context("fork")  # the children inherit both
    runs = [context.Process(target=_writes, args=(10 * i,)) for i in range(1, 5)]
    for run in runs:
        run.start()
    for run in runs:
        run.join()
    assert len(json.loads((tmp_path / "latency.json").read_text())) == 40
    monkeypatch.setattr(latency_cache, "MAX_ENTRIES", 3)
    _writes(100)
    assert len(json.loads((tmp_path / "latency.json").read_text())) == 3
