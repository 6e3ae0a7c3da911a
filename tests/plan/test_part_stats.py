"""Each part judged against FP32 (`qdq.plan.part_stats`, `qdq.plan.detections`): detections
matched per class, and the worst part that every choice maximises, whatever an output holds
(NaN, another number of rows)."""

from __future__ import annotations

import numpy as np
import pytest

from qdq.plan.detections import Detections, detect, match
from qdq.plan.method import _worst_per_sample
from qdq.plan.part_stats import judged, worst_sqnr
from qdq.plan.parts import output_parts

RNG = np.random.default_rng(1)


def test_detections_are_thresholded_and_suppressed_per_class():
    boxes = np.array([[5, 5, 10, 10], [6, 5, 10, 10], [6, 5, 10, 10], [50, 50, 4, 4]], np.float32)
    scores = np.array([[0.9, 0.0], [0.8, 0.0], [0.0, 0.7], [0.2, 0.1]], np.float32)
    corners, classes, confidence = detect(boxes, scores)
    # Box 1 overlaps box 0 (same class, IoU 0.82) and goes; box 2 is another class and stays;
    # box 3 is under the threshold.
    assert classes.tolist() == [0, 1]
    assert confidence.tolist() == pytest.approx([0.9, 0.7])
    assert corners[0].tolist() == [0, 0, 10, 10]


def test_f1_counts_matches_of_the_same_class_above_half_overlap():
    ref = (np.array([[0, 0, 10, 10], [20, 20, 30, 30.0]]), np.array([0, 1]), np.ones(2))
    # One box moved 2 px (IoU 80 / 120 = 0.67: a match), one of the wrong class, one extra.
    got = (np.array([[2, 0, 12, 10], [20, 20, 30, 30], [50, 50, 60, 60.0]]), np.array([0, 0, 1]),
           np.ones(3))  # fmt: skip
    assert match(ref, got) == 1  # F1 = 2 * 1 / (2 + 3) = 0.4


@pytest.mark.parametrize("order", [(0, 1), (1, 0)])
def test_a_nan_output_is_the_worst_part_in_any_order(order):
    """An int8 output of NaN (0 / 0 where FP32 divides by a small value) is what a choice must
    avoid, wherever the model lists it."""
    a = RNG.standard_normal((4, 8)).astype(np.float32)
    want, got = [a, a + 1], [a + 0.01, np.full_like(a, np.nan)]
    names = [["a", "b"][i] for i in order]
    want, got = [want[i] for i in order], [got[i] for i in order]
    assert worst_sqnr(judged(output_parts(names, [want]), [want], [got])) == -np.inf


def test_a_detection_with_negative_sides_matches_itself():
    """A head's box of width and height -10 (no area) is judged alike in both models: F1 1
    (its corners had crossed, so its area was positive and its IoU with itself 0)."""
    head = np.array([[[50], [50], [-10], [-10], [0.9], [0.1]]], np.float32)  # (1, 6, 1)
    detections = Detections(1, (0, 4), (4, 6))
    detections.update(head, head)
    assert detections.f1 == 1.0


def test_an_output_of_another_size_is_the_worst_score_and_left_out_of_sqnr():
    """The int8 NMS kept 4 boxes where FP32's kept 5: no SQNR between them, and the choices
    score that the worst (the comparison had ended the quantize, blaming the user's model)."""
    five = np.concatenate([RNG.uniform(0, 640, (1, 5, 4)), RNG.uniform(0, 1, (1, 5, 2))], 2)
    parts = output_parts(["y"], [[five]])
    stats = judged(parts, [[five], [five]], [[five[:, :4]], [five + 0.01]])
    assert [s.error.unmatched for s in stats] == [1] * len(stats)
    assert all(np.isfinite(s.error.sqnr_db) for s in stats)  # the batch of one shape
    assert worst_sqnr(stats) == -np.inf
    where = {"y": 0}
    scored = _worst_per_sample(
        [p for g in parts.values() for p in g], where, [five], [five[:, :4]], 1
    )
    assert scored.tolist() == [-np.inf]
