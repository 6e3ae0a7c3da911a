"""FP32's outputs that candidates are scored on come from calibration's own runs: the same
outputs the model gives when run for them, at any batch size, and run again only where a batch's
outputs cannot be split into its samples or joined again."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper

import qdq.plan.reference as reference_module
import qdq.ptq as ptq_module
from qdq.config import QuantConfig
from qdq.data import Samples, model_inputs
from qdq.observers import make_observer
from qdq.onnx.model import float_outputs, load_model
from qdq.pipeline import quantize_model
from qdq.plan.calibrate import observe_holding
from qdq.plan.reference import TakenOutputs, float_reference

from conftest import DIGITS

HELD = 10
LEADING = 16


def _cnn(batch_one: bool = False, summed: bool = False) -> onnx.ModelProto:
    """The digits CNN; with `batch_one` its batch axis fixed at 1 (a batch-1 export); with
    `summed` its logits summed (a scalar: an output that does not lead with the batch)."""
    model = load_model(DIGITS / "cnn.onnx")
    if batch_one:
        model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1
    if summed:
        logits = model.graph.output[0]
        model.graph.node.append(
            helper.make_node("ReduceSum", [logits.name], ["summed"], keepdims=0)
        )
        model.graph.output[0].CopyFrom(helper.make_tensor_value_info("summed", 1, None))
    return model


def _calibrated(model: onnx.ModelProto, samples: Samples, batch_size: int) -> TakenOutputs:
    """Calibration's tap of FP32's outputs on the first LEADING and the last HELD samples."""
    wanted = [*range(LEADING), *range(samples.count - HELD, samples.count)]
    taken = TakenOutputs(float_outputs(model), wanted)
    convs = [n.output[0] for n in model.graph.node if n.op_type == "Conv"]
    make = lambda _: make_observer("percentile")  # noqa: E731
    observe_holding(model, samples, make, convs, batch_size, HELD, False, taps=[taken])
    return taken


def _same(got: list[list[np.ndarray]], want: list[list[np.ndarray]]) -> None:
    assert len(got) == len(want)
    for ours, theirs in zip(got, want, strict=True):
        for a, b in zip(ours, theirs, strict=True):
            assert a.shape == b.shape
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("batch_size", "batch_one"), [(1, False), (8, False), (8, True)])
def test_the_references_come_from_calibration_as_the_model_gives_them(
    batch_size, batch_one, monkeypatch
):
    model = _cnn(batch_one)
    samples = Samples(DIGITS / "calib.npz", model_inputs(model), max_samples=60)
    taken = _calibrated(model, samples, batch_size)
    first = samples.count - HELD
    held_feeds = list(samples.span(first, samples.count).batches(batch_size))
    leading_feeds = list(samples.batches(batch_size, last=LEADING))
    held, leading = (
        float_reference(model, held_feeds, [samples.held_in(f) for f in held_feeds]),
        float_reference(model, leading_feeds, [samples.held_in(f) for f in leading_feeds]),
    )

    def not_run(*_: object) -> None:
        raise AssertionError("the model ran again for outputs calibration had")

    monkeypatch.setattr(reference_module, "float_reference", not_run)
    got_held = taken.last(model, samples, batch_size, HELD)
    got_leading = taken.reference(model, samples, 0, leading_feeds)
    for got, want in ((got_held, held), (got_leading, leading)):
        assert got.names == want.names == ["logits"]
        _same(got.outputs, want.outputs)
        # their own memory: an array ONNX Runtime returned holds its session's arena
        assert all(o.base is None for outputs in got.outputs for o in outputs)
        for ours, theirs in zip(got.feeds, want.feeds, strict=True):
            assert all(np.array_equal(ours[k], theirs[k]) for k in theirs)


def test_outputs_that_do_not_lead_with_the_batch_are_run_again():
    model = _cnn(summed=True)
    samples = Samples(DIGITS / "calib.npz", model_inputs(model), max_samples=60)
    taken = _calibrated(model, samples, 8)
    assert not taken.whole  # a batch of 8 gave one sum: it cannot be split
    feeds = list(samples.span(samples.count - HELD, samples.count).batches(8))
    got = taken.last(model, samples, 8, HELD)
    _same(got.outputs, float_reference(model, feeds, [samples.held_in(f) for f in feeds]).outputs)
    assert [o[0].shape for o in got.outputs] == [(), ()]  # a sum over 8 samples, then 2


def test_a_batch_one_model_is_planned_without_running_fp32_for_its_references(
    tmp_path, monkeypatch
):
    source = tmp_path / "cnn_batch1.onnx"
    onnx.save(_cnn(batch_one=True), source)

    def not_run(*_: object) -> None:
        raise AssertionError("the model ran again for outputs calibration had")

    for module in (reference_module, ptq_module):
        monkeypatch.setattr(module, "float_reference", not_run)
    config = QuantConfig(max_samples=64)
    report = quantize_model(source, tmp_path / "int8.onnx", DIGITS / "calib.npz", config)
    assert not [note for note in report.notes if "skipped" in note]
    assert any(note.startswith("range method") for note in report.notes)  # scored on the held
    assert report.candidates  # the frontier's plans, scored on the first samples


def _padded(model: onnx.ModelProto) -> onnx.ModelProto:
    """The CNN's logits cut to as many columns as eight times the batch's brightest centre
    pixel asks (1..9): an output whose shape depends on the whole batch, as detections padded
    to a batch's most."""
    nodes = [
        helper.make_node("Flatten", ["input"], ["flat"]),
        helper.make_node("Slice", ["flat", "centre", "after", "one"], ["pixel"]),
        helper.make_node("ReduceMax", ["pixel"], ["top"], keepdims=0),
        helper.make_node("Mul", ["top", "eight"], ["scaled"]),
        helper.make_node("Cast", ["scaled"], ["whole"], to=onnx.TensorProto.INT64),
        helper.make_node("Clip", ["whole", "one_scalar", "nine"], ["clipped"]),
        helper.make_node("Reshape", ["clipped", "one"], ["width"]),
        helper.make_node("Slice", ["logits", "zero", "width", "one"], ["padded"]),
    ]
    model.graph.node.extend(nodes)
    model.graph.initializer.extend(
        onnx.numpy_helper.from_array(np.array(v, np.int64), name)
        for name, v in (("zero", [0]), ("one", [1]), ("one_scalar", 1), ("nine", 9))
    )
    model.graph.initializer.extend([
        onnx.numpy_helper.from_array(np.array([27], np.int64), "centre"),
        onnx.numpy_helper.from_array(np.array([28], np.int64), "after"),
        onnx.numpy_helper.from_array(np.array(8, np.float32), "eight"),
    ])  # fmt: skip
    model.graph.output[0].CopyFrom(helper.make_tensor_value_info("padded", 1, None))
    return model


def test_outputs_whose_shape_depends_on_the_batch_are_run_again():
    """Calibration batches the samples otherwise than the references do ([0], [1..8], ...
    against [0..7], ...): an output padded to its batch's most cannot be joined, so the model
    runs for the reference, where the method choice and the rounding check had failed."""
    model = _padded(_cnn())
    samples = Samples(DIGITS / "calib.npz", model_inputs(model), max_samples=60)
    taken = _calibrated(model, samples, 8)
    feeds = list(samples.batches(8, last=LEADING))
    got = taken.reference(model, samples, 0, feeds)
    _same(got.outputs, float_reference(model, feeds, [samples.held_in(f) for f in feeds]).outputs)


def test_the_rows_a_reference_takes_are_not_kept_twice():
    """A reference holds its own copies; the rows it was joined from are dropped."""
    model = _cnn()
    samples = Samples(DIGITS / "calib.npz", model_inputs(model), max_samples=60)
    taken = _calibrated(model, samples, 8)
    taken.last(model, samples, 8, HELD)
    taken.reference(model, samples, 0, list(samples.batches(8, last=LEADING)))
    assert taken.taken == {}


def test_no_outputs_are_kept_where_nothing_scores_on_them(tmp_path, monkeypatch):
    """An explicit method and `--prefer int8`: no method choice, no checks, no frontier, so no
    FP32 outputs to keep."""
    kept = []
    monkeypatch.setattr(TakenOutputs, "jobs", lambda self, *a: kept.append(self.wanted) or [])
    config = QuantConfig(method="minmax", prefer="int8", max_samples=32)
    quantize_model(DIGITS / "cnn.onnx", tmp_path / "int8.onnx", DIGITS / "calib.npz", config)
    assert kept == []
