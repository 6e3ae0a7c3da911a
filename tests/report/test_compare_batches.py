"""Evaluation and the report's per-layer pass keep one batch's tensors within a memory budget,
with the same measurements."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from onnxruntime.capi.onnxruntime_pybind11_state import Fail

import models
import qdq.report.compare as compare_module
import qdq.report.latency as latency_module
import qdq.report.measure as measure_module
from qdq.metrics import ErrorStats
from qdq.pipeline import quantize_model
from qdq.plan.timing import TIMING_STEPS
from qdq.report.compare import compare_models
from qdq.report.html import render
from qdq.report.measure import STREAM_BATCH, measure

from conftest import DIGITS


def test_evaluation_batches_shrink_to_the_memory_budget_and_measure_the_same(tmp_path, monkeypatch):
    quantized = tmp_path / "q.onnx"
    quantize_model(DIGITS / "cnn.onnx", quantized, DIGITS / "calib.npz")
    args = (DIGITS / "cnn.onnx", quantized, DIGITS / "test.npz")
    lengths: list[int] = []
    update = ErrorStats.update

    def recorded(self, reference, quantized, *rest):
        lengths.append(len(reference))
        return update(self, reference, quantized, *rest)

    monkeypatch.setattr(ErrorStats, "update", recorded)
    roomy = compare_models(*args, batch_size=32, latency_runs=0)
    assert max(lengths) == 32
    lengths.clear()
    monkeypatch.setattr(compare_module, "EVAL_BUDGET", 1)  # below one sample: batches of one
    tight = compare_models(*args, batch_size=32, latency_runs=0)
    assert set(lengths) == {1}
    assert tight.samples == roomy.samples == 540
    assert tight.accuracy == roomy.accuracy
    for name, stats in roomy.layers.items():
        assert tight.layers[name].sqnr_db == pytest.approx(stats.sqnr_db, rel=1e-9)
    for name, stats in roomy.outputs.items():
        assert tight.outputs[name].sqnr_db == pytest.approx(stats.sqnr_db, rel=1e-9)


def test_the_reports_layer_pass_shrinks_its_batches_to_the_memory_budget(tmp_path, monkeypatch):
    """Every tensor of both models, 16 samples a batch, had taken PP-OCRv6's detector's report
    to an 11 GB peak."""
    quantized = tmp_path / "q.onnx"
    quantize_model(DIGITS / "cnn.onnx", quantized, DIGITS / "calib.npz")
    args = (DIGITS / "cnn.onnx", quantized, DIGITS / "test.npz")
    lengths: list[int] = []

    class Recorded(ErrorStats):  # the per-layer pass's stats only (compare's are its own)
        def update(self, reference, approximation, *rest):
            lengths.append(len(reference))
            return super().update(reference, approximation, *rest)

    monkeypatch.setattr(measure_module, "ErrorStats", Recorded)
    roomy = measure(*args, max_samples=64)
    assert max(lengths) == STREAM_BATCH
    lengths.clear()
    monkeypatch.setattr(measure_module, "EVAL_BUDGET", 1)  # below one sample: batches of one
    tight = measure(*args, max_samples=64)
    assert set(lengths) == {1}
    assert [r.node for r in tight.layers] == [r.node for r in roomy.layers]
    for a, b in zip(tight.layers, roomy.layers, strict=True):
        assert a.sqnr_db == pytest.approx(b.sqnr_db, rel=1e-9)


def test_the_reports_layer_pass_sizes_its_batches_past_a_sequence_tensor(tmp_path):
    """A SplitToSequence's output has no bytes to count: the sizing had raised AttributeError."""
    nodes = [
        helper.make_node("SplitToSequence", ["x"], ["s"], axis=1, name="split"),
        helper.make_node("ConcatFromSequence", ["s"], ["c"], axis=1, name="concat"),
        helper.make_node("Relu", ["c"], ["y"], name="relu"),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])
    graph = helper.make_graph(nodes, "sequence", [x], [y])
    path = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    np.savez(tmp_path / "d.npz", x=np.random.default_rng(0).random((5, 4), np.float32))
    data = measure(path, path, tmp_path / "d.npz")
    assert {r.node: r.sqnr_db for r in data.layers}["relu"] == np.inf  # the same model twice


def test_latency_is_also_timed_at_a_batch_where_the_model_takes_one(tmp_path):
    """Int8's gain one sample at a time can be a fraction of its gain at a batch (the digits
    CNN: about FP32's time one by one, 0.7x at 16), so compare times both; not where the
    model's batch axis is fixed at 1, nor untimed."""
    quantized = tmp_path / "q.onnx"
    quantize_model(DIGITS / "cnn.onnx", quantized, DIGITS / "calib.npz")
    timed = compare_models(DIGITS / "cnn.onnx", quantized, DIGITS / "test.npz", latency_runs=3)
    batch, fp32, int8 = timed.batch_latency_ms
    assert batch == 32  # the evaluation's batch: the digits run far under BATCH_RUN_MS
    assert min(fp32, int8) > 0
    assert timed.as_dict()["batch_latency_ms"] == {
        "batch": 32,
        "float": fp32,
        "quantized": int8,
        "sequence": False,
    }
    assert "1 thread, batch 32, median)" in timed.to_text()
    assert "<th>latency (1 thread, batch 32, median)</th>" in render(measure(
        DIGITS / "cnn.onnx", quantized, DIGITS / "test.npz", max_samples=64
    ))  # fmt: skip
    untimed = compare_models(DIGITS / "cnn.onnx", quantized, DIGITS / "test.npz", latency_runs=0)
    assert untimed.batch_latency_ms is None
    fixed = onnx.load(DIGITS / "cnn.onnx")  # the same network exported with batch 1
    fixed.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1
    onnx.save(fixed, tmp_path / "one.onnx")
    quantize_model(tmp_path / "one.onnx", tmp_path / "one_q.onnx", DIGITS / "calib.npz")
    one = compare_models(tmp_path / "one.onnx", tmp_path / "one_q.onnx", DIGITS / "test.npz",
                         latency_runs=3, max_samples=16)  # fmt: skip
    assert one.latency_ms is not None
    assert one.batch_latency_ms is None
    assert "batch 1, median" in one.to_text()


def test_a_sequence_model_is_timed_on_a_run_of_its_steps(tmp_path):
    """Silero VAD's frames beside a state fixed at batch 1: one frame a call is not how the
    model runs (int8 at 0.73x FP32's time per frame, 0.24x on a 4 s clip), so compare times a
    run of frames too, as the frontier does."""
    rng = np.random.default_rng(0)
    frames = rng.standard_normal((200, 60)).astype(np.float32)
    state = rng.standard_normal((200, 16)).astype(np.float32)
    np.savez(tmp_path / "d.npz", frames=frames, state=state)
    onnx.save(models.frame_net(), tmp_path / "frames.onnx")
    quantize_model(tmp_path / "frames.onnx", tmp_path / "q.onnx", tmp_path / "d.npz")
    result = compare_models(tmp_path / "frames.onnx", tmp_path / "q.onnx", tmp_path / "d.npz",
                            latency_runs=3)  # fmt: skip
    assert result.batch_latency_ms[0] == TIMING_STEPS
    assert result.sequence
    assert result.as_dict()["batch_latency_ms"]["sequence"] is True
    assert f"1 thread, {TIMING_STEPS} steps in one run, median)" in result.to_text()


def test_a_model_that_runs_no_batch_keeps_its_batch_1_latency(tmp_path, monkeypatch):
    """ONNX Runtime refusing the batch (a Reshape that bakes in batch 1) leaves the batch row
    out; an error of qdq's own is not swallowed."""
    quantized = tmp_path / "q.onnx"
    quantize_model(DIGITS / "cnn.onnx", quantized, DIGITS / "calib.npz")
    timed = latency_module.median_latency_ms

    def refusing(error: Exception):
        def run(models, feed, runs, budget_s=None):
            if len(next(iter(feed.values()))) > 1:
                raise error
            return timed(models, feed, runs, budget_s)

        return run

    monkeypatch.setattr(latency_module, "median_latency_ms", refusing(Fail("batch of 32")))
    args = (DIGITS / "cnn.onnx", quantized, DIGITS / "test.npz")
    result = compare_models(*args, latency_runs=3, max_samples=64)
    assert result.latency_ms is not None
    assert result.batch_latency_ms is None
    monkeypatch.setattr(latency_module, "median_latency_ms", refusing(TypeError("a bug")))
    with pytest.raises(TypeError, match="a bug"):
        compare_models(*args, latency_runs=3, max_samples=64)
