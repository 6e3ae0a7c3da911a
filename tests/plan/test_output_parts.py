"""Outputs judged as tasks: a head's parts found from FP32's outputs (or declared), each part's
SQNR, class agreement and a detection head's F1, and the worst part driving automatic choices."""

from __future__ import annotations

import re

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from head_models import classifier_head, detector_head, yolo_head
from qdq.data import Samples, model_inputs
from qdq.errors import DataError
from qdq.observers import Observer, make_observer
from qdq.pipeline import quantize_model
from qdq.plan.budget import sqnr_score
from qdq.plan.calibrate import observe, observe_holding
from qdq.plan.method import MAJORITY, MARGIN, sample_scores
from qdq.plan.part_stats import judged, part_stats, update_all, worst_sqnr
from qdq.plan.parts import (
    Gate,
    Kind,
    Part,
    find_parts,
    is_detection,
    output_parts,
    parse_parts,
)
from qdq.plan.reference import float_reference

RNG = np.random.default_rng(1)


def yolo_output(samples: int = 8, classes: int = 18, anchors: int = 50) -> np.ndarray:
    """(samples, 4 + classes, anchors): boxes in pixels, then sigmoid scores."""
    boxes = RNG.uniform(10, 300, (samples, 4, anchors))
    scores = 1 / (1 + np.exp(-RNG.normal(-3, 2, (samples, classes, anchors))))
    return np.concatenate([boxes, scores], axis=1).astype(np.float32)


def test_a_yolo_head_splits_into_boxes_and_scores():
    parts = find_parts("output0", [yolo_output()])
    assert parts == [
        Part("output0", 1, 0, 4, Kind.BOXES),
        Part("output0", 1, 4, 22, Kind.SCORES),
    ]
    assert is_detection(parts)
    assert [p.label for p in parts] == ["output0[:, 0:4]", "output0[:, 4:22]"]


def test_a_segmenters_head_splits_into_boxes_score_and_mask_coefficients():
    # YOLOv8-seg: its 32 coefficients reach 4.8-6.7 on the slider captchas' draws, under GAP:
    # with every value run held to GAP, the head split on one draw of three (docs/unseen.md)
    coefficients = RNG.uniform(-5, 5, (8, 32, 50)).astype(np.float32)
    head = np.concatenate([yolo_output(classes=1), coefficients], axis=1)
    parts = find_parts("output0", [head])
    assert [(p.start, p.stop, p.kind) for p in parts] == [
        (0, 4, Kind.BOXES),
        (4, 5, Kind.SCORES),
        (5, 37, Kind.VALUES),
    ]
    assert is_detection(parts)
    stats = part_stats(parts)
    update_all(stats, head, head)
    assert stats[1].as_dict()["detection_f1"] == 1.0


def test_box_deltas_beside_landmarks_in_pixels_are_no_detection_head():
    """A face detector's [4 box deltas | score | 10 landmarks] (RetinaFace, SCRFD): the pixels
    split it, but its first four values are 0.4-wide deltas, not boxes to match by IoU."""
    deltas = RNG.uniform(-0.45, 0.45, (8, 4, 50))
    landmarks = RNG.uniform(0, 320, (8, 10, 50))
    head = np.concatenate([deltas, yolo_output(classes=1)[:, 4:5], landmarks], axis=1)
    parts = find_parts("y", [head.astype(np.float32)])
    assert [(p.start, p.stop, p.kind) for p in parts] == [
        (0, 4, Kind.VALUES),
        (4, 5, Kind.SCORES),
        (5, 15, Kind.VALUES),
    ]
    assert not is_detection(parts)


def test_few_samples_or_image_rows_never_split_an_output():
    """One sample of two-class logits looks like [values | scores]; so do a depth map's rows."""
    assert find_parts("y", [np.array([[12.0, 0.5]], np.float32)]) == [Part("y")]
    depth = np.concatenate([np.full((8, 1, 4, 6), 20.0), np.full((8, 1, 4, 6), 0.5)], axis=2)
    assert find_parts("depth", [depth.astype(np.float32)]) == [Part("depth")]
    assert find_parts("y", [yolo_output(samples=2)]) == [Part("y")]


def test_parts_are_found_only_where_the_layout_is_clear():
    small = yolo_output()
    small[:, :4] /= 1000  # offsets under GAP next to scores: no certain split
    interleaved = yolo_output()[:, [0, 5, 1, 6, 2, 7]]  # six runs
    scores_only = yolo_output()[:, 4:]
    for output in (small, interleaved, scores_only):
        assert find_parts("y", [output]) == [Part("y")]


def test_the_statistics_of_every_batch_decide():
    first, second = yolo_output(), yolo_output()
    second[0, 7, 0] = 1.5  # a score channel leaves [0, 1] in a later batch, but not by GAP
    assert len(find_parts("y", [first])) == 2
    assert find_parts("y", [first, second]) == [Part("y")]


def test_declared_parts_take_their_kinds_from_the_statistics():
    parts = find_parts("y", [yolo_output()], ["y:1:0-2,2-4,4-22"])
    assert [(p.start, p.stop, p.kind) for p in parts] == [
        (0, 2, Kind.VALUES),
        (2, 4, Kind.VALUES),
        (4, 22, Kind.SCORES),
    ]
    assert parse_parts("out:2:0-4,4-84") == ("out", 2, [(0, 4), (4, 84)])


@pytest.mark.parametrize(
    ("spec", "says"),
    [
        ("y:1:4-2", "START < STOP"),
        ("y:0:0-4", "axis must be >= 1"),
        ("y-1-0-4", "NAME:AXIS"),
        ("y:1:0-10,4-22", "overlap"),
    ],
)
def test_a_bad_declaration_says_what_is_wrong(spec, says):
    with pytest.raises(DataError, match=says):
        find_parts("y", [yolo_output()], [spec])


def test_a_declaration_must_fit_and_name_an_output():
    with pytest.raises(DataError, match="does not fit"):
        find_parts("y", [yolo_output()], ["y:1:0-4,4-40"])
    with pytest.raises(DataError, match="names no float output"):
        output_parts(["y"], [[yolo_output()]], ["boxes:1:0-4"])


def test_each_part_has_its_own_sqnr():
    # Error 1 pixel on every box value (|x| ~ 155) and 0.01 on every score.
    want = yolo_output()
    got = want.copy()
    got[:, :4] += 1.0
    got[:, 4:] += 0.01
    boxes, scores = judged(output_parts(["y"], [[want]]), [[want]], [[got]])
    box_signal = np.mean(want[:, :4].astype(np.float64) ** 2)
    score_signal = np.mean(want[:, 4:].astype(np.float64) ** 2)
    assert boxes.error.sqnr_db == pytest.approx(10 * np.log10(box_signal / 1.0), abs=1e-3)
    assert scores.error.sqnr_db == pytest.approx(10 * np.log10(score_signal / 1e-4), abs=1e-2)
    assert worst_sqnr([boxes, scores]) == scores.error.sqnr_db < boxes.error.sqnr_db


def test_class_agreement_counts_the_confident_positions():
    # Two samples, 2 classes, 3 anchors; FP32 is confident (> 0.25) at 3 of the 6 positions.
    want = np.zeros((2, 6, 3), np.float32)
    want[:, :4] = 100
    # Rows are classes, columns anchors.
    want[0, 4:, :] = [[0.9, 0.1, 0.1], [0.1, 0.1, 0.2]]  # confident at anchor 0 (class 0)
    want[1, 4:, :] = [[0.1, 0.6, 0.2], [0.8, 0.1, 0.1]]  # anchors 0 (class 1), 1 (class 0)
    got = want.copy()
    got[1, 4, 0] = 0.85  # anchor 0 of sample 1 now says class 0: 2 of 3 agree
    parts = find_parts("y", [want], ["y:1:0-4,4-6"])  # two samples: declared, not found
    stats = part_stats(parts)
    update_all(stats, want, got)
    scores = stats[1].as_dict()
    assert scores["top1_agreement"] == pytest.approx(2 / 3)
    assert scores["top5_agreement"] == 1.0  # two classes: always in the top 5


def test_a_detection_head_gets_f1_and_identical_outputs_score_one():
    want = yolo_output(samples=8)
    stats = part_stats(find_parts("y", [want]))
    update_all(stats, want, want)
    assert stats[1].detections.reference > 0
    assert stats[1].as_dict()["detection_f1"] == 1.0
    moved = want.copy()
    moved[:, 4:] = np.where(moved[:, 4:] > 0.25, 0.0, moved[:, 4:])  # nothing detected
    stats = part_stats(find_parts("y", [want]))
    update_all(stats, want, moved)
    assert stats[1].as_dict()["detection_f1"] == 0.0


def test_shards_merge_into_the_whole():
    want = yolo_output(samples=8)
    got = want + RNG.normal(0, 0.05, want.shape).astype(np.float32)
    parts = find_parts("y", [want])
    whole, first, second = part_stats(parts), part_stats(parts), part_stats(parts)
    update_all(whole, want, got)
    update_all(first, want[:2], got[:2])
    update_all(second, want[2:], got[2:])
    for a, (b, c) in zip(whole, zip(first, second, strict=True), strict=True):
        assert b.merged(c).as_dict() == pytest.approx(a.as_dict())


def test_the_budget_scores_the_worst_part(tmp_path):
    model = yolo_head()
    feeds = [{"x": RNG.standard_normal((8, 3, 8, 8)).astype(np.float32)}]
    want = ort.InferenceSession(model.SerializeToString()).run(None, feeds[0])[0]
    noisy = model.__deepcopy__()
    for init in noisy.graph.initializer:  # the class scores' conv, perturbed
        if init.name == "bc":
            init.float_data[:] = []
            init.raw_data = np.full(3, -0.9, np.float32).tobytes()
    got = ort.InferenceSession(noisy.SerializeToString()).run(None, feeds[0])[0]
    expected = worst_sqnr(judged(output_parts(["y"], [[want]]), [[want]], [[got]]))
    pooled = 10 * np.log10(np.sum(want.astype(np.float64) ** 2) / np.sum((want - got) ** 2))
    assert sqnr_score(float_reference(model, feeds, [len(f["x"]) for f in feeds]))(
        noisy
    ) == pytest.approx(expected)
    assert expected < pooled - 20  # the pooled tensor hid the scores' error


def test_the_quantize_report_judges_a_detector_head_by_its_parts(tmp_path):
    np.save(tmp_path / "x.npy", RNG.standard_normal((64, 16)).astype(np.float32))
    (tmp_path / "m.onnx").write_bytes(detector_head().SerializeToString())
    report = quantize_model(tmp_path / "m.onnx", tmp_path / "q.onnx", tmp_path / "x.npy")
    assert list(report.output_sqnr) == ["y[:, 0:4]", "y[:, 4:10]"]
    assert set(report.output_tasks["y[:, 4:10]"]) == {
        "top1_agreement",
        "top5_agreement",
        "detection_f1",
    }
    summary = report.summary(tmp_path / "q.onnx")
    assert "'y[:, 4:10]'" in summary
    rows = report.output_rows["y[:, 4:10]"]  # the confident positions of the 16 samples
    assert 0 < rows <= 16
    assert re.search(
        rf"'y\[:, 4:10\]' [\d.]+ dB \(top-1 \d+ of {rows}, top-5 \d+ of {rows}, F1 ", summary
    )
    assert any(note.startswith("range method ") for note in report.notes)


def test_the_default_keeps_the_method_whose_worst_part_is_best_on_held_samples(tmp_path):
    np.save(tmp_path / "x.npy", RNG.standard_normal((64, 3, 8, 8)).astype(np.float32))
    (tmp_path / "m.onnx").write_bytes(yolo_head().SerializeToString())
    report = quantize_model(tmp_path / "m.onnx", tmp_path / "q.onnx", tmp_path / "x.npy")
    note = next(n for n in report.notes if n.startswith("range method "))
    chosen = note.split()[2].rstrip(":")
    shown = note.split("(")[1].split(")")[0]
    scores = dict(re.findall(r"(\w+) (-?[\d.]+|inf)", re.sub(r"\[.*?\]", "", shown)))
    above = {m: int(share) for m, share in re.findall(r"(\w+) \S+ \[above on (\d+)%\]", shown)}
    assert "on 16 calibration samples held out of the ranges" in note  # a quarter of 64
    assert set(scores) == {"percentile", "minmax", "mse", "auto"}
    assert set(above) == {"minmax", "mse", "auto"}
    assert "a median more than 0.5 dB higher and above it on at least 67% of the samples" in note
    # A replacement leads percentile's (median) score by the margin, and beats the rest.
    if chosen != "percentile":
        assert float(scores[chosen]) > float(scores["percentile"]) + MARGIN
        assert float(scores[chosen]) == max(float(v) for v in scores.values())
        assert above[chosen] >= 100 * MAJORITY


def test_held_samples_are_scored_one_at_a_time_by_their_worst_part():
    model = yolo_head()
    x = RNG.standard_normal((6, 3, 8, 8)).astype(np.float32)
    feeds = [{"x": x[:4]}, {"x": x[4:]}]
    noisy = model.__deepcopy__()
    for init in noisy.graph.initializer:  # the class scores' conv, perturbed
        if init.name == "bc":
            init.float_data[:] = []
            init.raw_data = np.full(3, -0.9, np.float32).tobytes()
    want = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})[0]
    got = ort.InferenceSession(noisy.SerializeToString()).run(None, {"x": x})[0]
    parts = output_parts(["y"], [[want]])
    expected = [
        worst_sqnr(judged(parts, [[want[i : i + 1]]], [[got[i : i + 1]]])) for i in range(6)
    ]
    score = sample_scores(float_reference(model, feeds, [4, 2]))
    assert score(noisy) == pytest.approx(expected)
    assert np.isinf(score(model)).all()  # FP32 itself: no error
    asked: list[int] = []
    early = score(noisy, lambda so_far: asked.append(len(so_far)) or True)
    assert asked == [4]  # the first feed's scores, then done
    assert early == pytest.approx(expected[:4])


def test_the_ranges_the_choice_judges_never_saw_the_held_samples(tmp_path):
    # 40 samples; the last 10 (held) are 10x larger, so a range that saw them is 10x wider.
    x = RNG.standard_normal((40, 3, 8, 8)).astype(np.float32)
    x[30:] *= 10
    np.save(tmp_path / "x.npy", x)
    model = yolo_head()
    samples = Samples(tmp_path / "x.npy", model_inputs(model))

    def make(name: str) -> Observer:  # one per tensor name
        return make_observer("percentile")

    names = ["b0", "c0"]
    held = observe_holding(model, samples, make, names, 8, 10, False, names)
    merged, apart, unfit, means, _ = held
    alone = observe(model, samples.span(0, 30), make, names, 8, False)[0]
    whole, _, whole_means, _ = observe(model, samples, make, names, 8, False, names)
    assert not unfit
    for name in names:  # the mean sample (for bias correction) is over all 40
        np.testing.assert_allclose(means[name].mean, whole_means[name].mean, atol=1e-6)  # f32 sums
        np.testing.assert_array_equal(means[name].peak, whole_means[name].peak)

    def bounds(observer):
        rng = observer.compute()
        return float(rng.lo), float(rng.hi)

    for name in names:
        assert bounds(apart[name]) == bounds(alone[name])
        assert bounds(merged[name]) == bounds(whole[name])  # the held samples continue it
        assert bounds(merged[name])[1] > 5 * bounds(apart[name])[1]


def test_a_classifier_output_stays_one_part_with_its_agreement(tmp_path):
    np.save(tmp_path / "x.npy", RNG.standard_normal((32, 16)).astype(np.float32))
    (tmp_path / "m.onnx").write_bytes(classifier_head().SerializeToString())
    report = quantize_model(tmp_path / "m.onnx", tmp_path / "q.onnx", tmp_path / "x.npy")
    assert list(report.output_sqnr) == ["y"]
    assert report.output_tasks["y"]["top1_agreement"] > 0.9
    # counted, so that a reader sees how few samples 1.000 stood for
    agreed = round(report.output_tasks["y"]["top1_agreement"] * 16)
    assert f"(top-1 {agreed} of 16, top-5 " in report.summary(tmp_path / "q.onnx")


def dense_head(samples: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """CenterFace's outputs in miniature: a heatmap with one face per sample, at cell (2, 3),
    and a map of offsets on the same grid, noise wherever there is no face."""
    heat = np.full((samples, 1, 6, 6), 0.01, np.float32)
    heat[:, 0, 2, 3] = 0.9
    return heat, RNG.uniform(-3, 3, (samples, 2, 6, 6)).astype(np.float32)


def shifted(offsets: np.ndarray) -> np.ndarray:
    """The offsets 1.0 off everywhere but 0.1 off at the faces."""
    got = offsets + 1.0
    got[:, :, 2, 3] = offsets[:, :, 2, 3] + 0.1
    return got


def test_a_dense_heads_value_maps_are_judged_where_its_scores_fire():
    heat, offsets = dense_head()
    parts = output_parts(["heat", "offsets"], [[heat, offsets]])
    assert parts == {"heat": [Part("heat")], "offsets": [Part("offsets", gate=Gate("heat", 1))]}
    _, judged_offsets = judged(parts, [[heat, offsets]], [[heat, shifted(offsets)]])
    faces = offsets[:, :, 2, 3].astype(np.float64)
    expected = 10 * np.log10(np.mean(faces**2) / 0.1**2)
    assert judged_offsets.error.sqnr_db == pytest.approx(expected, abs=1e-3)
    assert judged_offsets.part.label == "offsets where heat > 0.25"


def test_a_value_map_is_gated_only_by_a_firing_score_map_on_its_grid():
    heat, offsets = dense_head()
    prob, distances = np.moveaxis(heat, 1, -1), np.moveaxis(offsets, 1, -1)  # channels last
    gates = output_parts(["prob", "dist"], [[prob, distances]])["dist"][0].gate
    assert gates == Gate("prob", 3)
    quiet = np.full_like(heat, 0.2)  # never passes 0.25: nothing to judge the offsets by
    unrelated = heat[:, :, :5]  # another grid
    for outputs in ([quiet, offsets], [unrelated, offsets], [heat[:7], offsets[:7]]):
        parts = output_parts(["heat", "offsets"], [outputs])
        assert parts["offsets"] == [Part("offsets")]
    one_channel = offsets[:, :1]  # the same shape as the heatmap: no channel axis tells them
    assert output_parts(["heat", "o"], [[heat, one_channel]])["o"] == [Part("o")]


def test_held_samples_without_a_detection_are_judged_by_the_other_parts():
    heat, offsets = dense_head(samples=8)
    heat[5] = 0.01  # sample 5 has no face
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("h", "v")]
    outputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("heat", "o")]

    def model(shift: np.ndarray) -> onnx.ModelProto:
        nodes = [
            helper.make_node("Identity", ["h"], ["heat"]),
            helper.make_node("Add", ["v", "s"], ["o"]),
        ]
        graph = helper.make_graph(
            nodes, "head", inputs, outputs, [numpy_helper.from_array(shift, "s")]
        )
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])

    shift = shifted(np.zeros((1, 2, 6, 6), np.float32))
    feeds = [{"h": heat, "v": offsets}]
    reference = float_reference(model(np.zeros_like(shift)), feeds, [len(heat)])
    scores = sample_scores(reference)(model(shift))
    faces = offsets[:, :, 2, 3].astype(np.float64)
    expected = 10 * np.log10(np.sum(faces**2, axis=1) / (2 * 0.1**2))
    assert np.isinf(scores[5])  # nothing gated, and the heatmap exact
    assert scores[[0, 1, 2, 3, 4, 6, 7]] == pytest.approx(expected[[0, 1, 2, 3, 4, 6, 7]], abs=1e-3)


def test_parts_pass_over_batches_without_values():
    """A detector's NMS rows, (1, 0, 6) on a sample where it found none: the parts are found
    on the others (a zero-size batch had ended the quantize in an internal error), and a
    declared axis whose size changes between samples is refused."""
    found = [np.concatenate([RNG.uniform(0, 640, (1, n, 4)), RNG.uniform(0, 1, (1, n, 2))], 2)
             for n in (5, 7, 0, 3) * 4]  # fmt: skip
    assert [p.kind for p in find_parts("y", found)] == [Kind.BOXES, Kind.SCORES]
    assert [p.kind for p in find_parts("y", found, ["y:2:4-6,0-4"])] == [Kind.BOXES, Kind.SCORES]
    with pytest.raises(DataError, match="changes size from sample to sample"):
        find_parts("y", found, ["y:1:0-2,2-5"])
