"""A recognizer's output judged by what it reads: the frontier's score credits a candidate that
keeps FP32's class decisions at every step of every sample (read as CTC reads them where the
output has a blank), however far its probabilities moved."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from head_models import step_softmax
from qdq.plan.method import _worst_per_sample, sample_scores
from qdq.plan.parts import output_parts
from qdq.plan.readings import Readings, decision_outputs, read_alike
from qdq.plan.reference import float_reference

STEPS, CLASSES = 20, 6


def probabilities(tops: np.ndarray) -> np.ndarray:
    """(samples, steps, CLASSES) softmax outputs whose top class per step is `tops`."""
    logits = np.eye(CLASSES)[tops] * 6.0
    e = np.exp(logits)
    return (e / e.sum(-1, keepdims=True)).astype(np.float32)


def ctc_lines(samples: int = 4) -> np.ndarray:
    """Top classes per step as a CTC head writes them: blank (0) at most steps, between the
    characters and around them."""
    tops = np.zeros((samples, STEPS), np.int64)
    for s in range(samples):
        tops[s, 2:12:3] = [1 + (s + k) % (CLASSES - 1) for k in range(4)]  # 4 characters
    return tops


def test_a_ctc_head_is_read_as_ctc_reads_it_and_a_classifier_is_not_a_sequence():
    tops = ctc_lines()
    want = probabilities(tops)
    assert decision_outputs(["probs"], [[want]]) == {"probs": 0}  # class 0 is the blank
    padded = np.zeros_like(tops)  # a decoder's tokens, then padding that only trails them
    padded[:, :8] = 1 + np.arange(8) % (CLASSES - 1)
    assert decision_outputs(["tokens"], [[probabilities(padded)]]) == {"tokens": None}
    classifier = probabilities(tops[:, :1])[:, 0]  # (samples, classes): one decision each
    assert decision_outputs(["class"], [[classifier]]) == {}
    assert decision_outputs(["log"], [[np.log(want)]]) == {"log": 0}  # a log-softmax
    logits = np.log(want) + 1.0  # neither probabilities nor their logarithms
    assert decision_outputs(["logits"], [[logits]]) == {}


def _softmax_net(scale: float) -> onnx.ModelProto:
    """x[N, STEPS, CLASSES] -> Softmax(x * scale) over the classes."""
    return step_softmax("Mul", np.float32(scale), STEPS, CLASSES)


def test_a_candidate_that_reads_every_step_as_fp32_scores_at_least_the_floor():
    rng = np.random.default_rng(0)
    tops = np.concatenate([ctc_lines(), ctc_lines()])
    x = (np.eye(CLASSES)[tops] * 3.0 + rng.normal(0, 0.3, (*tops.shape, CLASSES))).astype(
        np.float32
    )
    reference = float_reference(_softmax_net(2.0), [{"x": x[:4]}, {"x": x[4:]}], [4, len(x) - 4])
    softer = _softmax_net(0.5)  # the same top class everywhere, probabilities far apart
    plain = sample_scores(reference)(softer)
    assert plain.max() < 15  # dB: the probabilities' error
    credited = sample_scores(reference, decided=35.0)(softer)
    np.testing.assert_allclose(credited, 35.0)
    flipped = sample_scores(reference, decided=35.0)(_softmax_net(-2.0))  # other classes
    assert flipped.max() < 0
    assert np.isinf(sample_scores(reference, decided=35.0)(_softmax_net(2.0))).all()  # FP32


@pytest.mark.parametrize(
    ("moved", "alike"),
    [
        ({(0, 2): 0, (0, 3): 1}, True),  # a character one step later: CTC reads the same
        ({(0, 3): 1}, True),  # a character over two steps: merged
        ({(0, 2): 2}, False),  # another character
        ({(0, 8): 0}, False),  # a character dropped
    ],
)
def test_ctc_reading_forgives_steps_but_not_characters(moved, alike):
    tops = ctc_lines()
    have = tops.copy()
    for (sample, step), value in moved.items():
        have[sample, step] = value
    want, got = probabilities(tops), probabilities(have)
    assert read_alike(want, got, 0) is alike  # 0: the blank
    assert read_alike(want, got, None) is False  # step by step, any move counts


def test_readings_count_each_sample_and_merge_shards_in_order():
    tops = ctc_lines()
    have = tops.copy()
    have[1, 2] = 2 if tops[1, 2] != 2 else 3  # the second line reads another character
    have[3, 2:4] = [0, tops[3, 2]]  # the fourth's first character one step later: the same
    first, second = Readings(0), Readings(0)
    first.update(probabilities(tops[:2]), probabilities(have[:2]))
    second.update(probabilities(tops[2:]), probabilities(have[2:]))
    both = first.merged(second)
    assert (both.alike, both.samples, both.share) == (3, 4, 0.75)
    assert both.as_text() == "CTC reading as FP32's on 3 of 4 samples"
    steps = Readings(None)  # position by position: the moved character counts too
    steps.update(probabilities(tops), probabilities(have))
    assert steps.as_text() == (  # 3 of the 80 steps moved
        "every position's class as FP32's on 2 of 4 samples (96.25% of positions)"
    )
    assert Readings(None).share is None


def test_a_sample_whose_infinities_are_kept_scores_as_exact_there():
    """inf - inf is NaN: an infinity FP32 and the candidate share (a masked logit) adds no
    error, and one only the candidate has is an infinite error."""
    want = [np.array([[3.0, -np.inf, 4.0], [3.0, 1.0, 4.0], [3.0, 1.0, 4.0]], np.float32)]
    have = [np.array([[3.0, -np.inf, 4.0], [3.0, np.inf, 4.0], [3.0, 1.0, 4.5]], np.float32)]
    parts = [p for group in output_parts(["y"], want).values() for p in group]
    worst = _worst_per_sample(parts, {"y": 0}, want, have, 3)
    assert worst[0] == np.inf  # every value kept, the infinity too
    assert worst[1] == -np.inf  # an infinity of its own
    assert worst[2] == pytest.approx(10 * np.log10(26 / 0.25))
