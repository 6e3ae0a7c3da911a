"""Post-training quantization's decisions from calibration data, as a plan.

`plan_model` calibrates the prepared model and decides everything the file will hold: the
range method, GPTQ or nearest rounding, which ops stay float (the frontier of `--prefer`, the
budget of `--target-sqnr`), AdaRound, and the bias corrections. Each optional stage that fails
on a model is skipped with a note (`optional`), and each choice that can hurt (the method, the
rounding, the sequential correction) is judged on calibration samples held out of the ranges,
by the worst output part.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import replace
from functools import cache, partial
from typing import TypeVar

import numpy as np
import onnx
import onnxruntime as ort

from qdq.config import Placement, Prefer, QuantConfig
from qdq.data import Samples
from qdq.errors import QdqError, first_line
from qdq.lowbit import WeightGrid
from qdq.observers import Method, Observer, make_observer
from qdq.onnx.graph import GraphIndex
from qdq.onnx.model import float_outputs
from qdq.onnx.sessions import open_session
from qdq.passes.adaround import learn_rounding
from qdq.passes.bias_correction import (
    correct_biases,
    correct_sequentially,
    correctable_outputs,
    correction_inputs,
)
from qdq.passes.gptq import SAMPLES as GPTQ_SAMPLES
from qdq.passes.gptq import HessianSums, linear_layers, rounded_codes
from qdq.passes.insert_qdq import insert_qdq
from qdq.plan.budget import meet_target, sqnr_score
from qdq.plan.build import Plan, build_plan
from qdq.plan.calibrate import fit_ranges, observe_holding
from qdq.plan.decisions import Decision, kept_float, static_decisions
from qdq.plan.families import Families
from qdq.plan.flow import Int8Flow
from qdq.plan.frontier import choose_plan, frontier_score, lstm_weights_int8
from qdq.plan.layout import SLOW_POOL, slow_pools
from qdq.plan.method import (
    MAJORITY,
    MARGIN,
    Fitted,
    candidate_ranges,
    choose_method,
    method_ranges,
    sample_scores,
)
from qdq.plan.recurrent import runtime_int8_lstms, with_runtime_int8
from qdq.plan.reference import Reference, TakenOutputs, float_reference
from qdq.plan.saturation import avoids_saturation, summed_inputs
from qdq.plan.timing import timing_feed

log = logging.getLogger(__name__)
T = TypeVar("T")
# A user's score of a quantized model, higher is better: given an ONNX Runtime session of the
# candidate, e.g. its accuracy on a labelled validation set.
Metric = Callable[[ort.InferenceSession], float]
BUDGET_SAMPLES = 128  # calibration samples that measure output SQNR for --target-sqnr
ADAROUND_SAMPLES = 32  # calibration samples whose layer inputs AdaRound learns from
SEQUENTIAL_SAMPLES = 128  # calibration samples that measure each layer's mean output shift
# Calibration samples that score each candidate plan of --prefer: the candidates differ by
# whole families of float ops, by dB (docs/ptq.md), more than 16 samples' noise.
FRONTIER_SAMPLES = 16
CHOICE_SAMPLES = 64  # calibration samples on which --method best scores each candidate plan


def plan_model(
    model: onnx.ModelProto,
    samples: Samples,
    config: QuantConfig,
    per_channel: bool,
    progress: bool,
    notes: list[str],
    metric: Metric | None = None,
) -> tuple[Plan, float]:
    """Calibrate the prepared model on `samples` and decide everything; returns the plan and
    the calibration time in seconds, and says in `notes` which optional stage failed on the
    model and was skipped. `metric` scores candidates for the accuracy budget."""
    index = GraphIndex(model)
    decisions = static_decisions(index, config)
    targets = Int8Flow(index, decisions, config).calibration_targets()
    start = time.perf_counter()
    quantizable = [name for name, d in decisions.items() if d.quantized]
    means = correction_inputs(index, quantizable) if config.bias_correction else []
    pairs = avoids_saturation(config)
    paired = summed_inputs(index, quantizable) if pairs else []
    sequential = config.bias_correction and config.sequential_bias_correction
    layers = correctable_outputs(index, quantizable) if sequential else []
    held = _held(samples, config) if quantizable else 0  # no int8 op: no choice, no check
    if held and not float_outputs(model):  # a mask or ids: nothing for the checks to compare
        notes.append(
            "no float32 output to compare with FP32's: the range method is percentile and "
            "the rounding and correction checks are not run"
        )
        held = 0
    # A low-bit grid the user asked for goes on every layer the rules allow: keeping layers
    # float is then --target-sqnr's or --exclude's job, not a latency trade.
    uniform = config.weights.bits == 8 and config.weight_grid is WeightGrid.UNIFORM
    timed = uniform and config.prefer is not Prefer.INT8 and config.target_sqnr is None
    timed = timed and config.placement is Placement.ORT  # the frontier's candidate plans
    # FP32's outputs on the samples candidates are scored on (the frontier's first, the held-out
    # last: the method choice's and the checks'), kept from calibration's runs
    last = range(samples.count - held, samples.count)
    taken = TakenOutputs(float_outputs(model), [*range(FRONTIER_SAMPLES if timed else 0), *last])
    held_reference = cache(partial(taken.last, model, samples, config.batch_size, held))
    held_score = cache(lambda: _by_content(sqnr_score(held_reference(), config.output_parts)))
    linear = linear_layers(index, quantizable) if config.gptq else []
    sums = HessianSums(index, linear, GPTQ_SAMPLES) if linear else None
    observers, apart, unfit, averages, float_means = observe_holding(
        model,
        samples,
        lambda _: make_observer(config.method, config.activations),
        targets,
        config.batch_size,
        held,
        progress,
        list(dict.fromkeys(means + paired)),
        config.workers,
        layers,
        SEQUENTIAL_SAMPLES,
        [tap for tap in (sums, taken) if tap is not None and tap.inputs],
    )
    # a model input's channels (an image's brightness) vary most beyond the samples: any code
    peaks = {n: averages[n].peak for n in paired if n in averages and n not in index.graph_inputs}
    ranges, unfit = fit_ranges({name: o.compute() for name, o in observers.items()}, unfit)
    means_of = {name: average.mean for name, average in averages.items()}
    learned: dict[tuple[str, int], np.ndarray] = {}
    found = {} if sums is None else optional("GPTQ rounding", notes, sums.found, {})
    rounded = partial(rounded_codes, index, found=found, pairs=pairs, cache={})
    corrections: dict[tuple, np.ndarray] = {}  # each layer's one-shot bias, per weight grid
    realize = partial(insert_qdq, model)

    def replan(
        chosen: dict[str, Decision], fitted: Fitted | None = None, rounding: bool = True
    ) -> Plan:
        fit = fitted or (ranges, unfit)
        plan = build_plan(index, chosen, *fit, config, per_channel, peaks)
        given = rounded(plan) if rounding else {}
        codes = {**given, **{k: v for k, v in learned.items() if k in plan.constants}}
        plan = replace(plan, weight_codes=codes)
        if not config.bias_correction:
            return plan
        return optional(
            "bias correction",
            notes,
            partial(correct_biases, index, plan, means_of, corrections),
            plan,
        )

    if held:
        choose = partial(_best_method, model, held_reference, config, held, apart, unfit)
        choose = partial(choose, partial(replan, decisions), notes)
        method = optional("the method choice", notes, choose, "percentile")
        grid = config.activations
        ranges, unfit = method_ranges(observers, unfit, grid, method)
    plan = replan(decisions)
    slow = optional("the layout probe", notes, partial(slow_pools, plan, realize), [])
    if slow:
        decisions = kept_float(decisions, slow, SLOW_POOL)
        plan = replan(decisions)
    lstms = runtime_int8_lstms(index, config)  # those that may run on int8 weights
    if timed:
        frontier = partial(_frontier, model, samples, config, decisions, replan, realize, taken)
        frontier = partial(frontier, notes, lstms)
        plan, decisions = optional("latency-aware planning", notes, frontier, (plan, decisions))
    elif config.target_sqnr is None and config.prefer is Prefer.INT8:  # LSTMs too, untimed
        twin = partial(_untimed_twin, plan, decisions, lstms, replan, realize)
        plan, decisions = optional("int8 LSTM weights", notes, twin, (plan, decisions))
    if found and held:
        nearest = partial(replan, decisions, rounding=False)
        check = partial(_gptq_pays, held_score, held, plan, nearest, realize, notes)
        if not optional("the rounding check", notes, check, True):
            found.clear()  # `rounded` reads it: this and every later re-plan round to nearest
            plan = replace(replan(decisions), frontier=plan.frontier, float_ms=plan.float_ms)
    if config.adaround:
        feeds = _leading_batches(samples, config.batch_size, ADAROUND_SAMPLES)
        adaround = partial(learn_rounding, model, index, plan, feeds)
        learned.update(optional("AdaRound", notes, adaround, {}))
        plan = replace(replan(decisions), frontier=plan.frontier, float_ms=plan.float_ms)
    seconds = time.perf_counter() - start
    if config.target_sqnr is not None:
        feeds = _leading_batches(samples, config.batch_size, BUDGET_SAMPLES)
        if metric is None:
            reference = float_reference(model, feeds, [samples.held_in(f) for f in feeds])
            score = sqnr_score(reference, config.output_parts, reuse=True)
        else:
            score = _session_score(metric)
        feed, timed = timing_feed(model, samples)
        search = partial(
            meet_target,
            *(decisions, replan, realize, score, config.target_sqnr, feed, config.workers),
            timed_samples=timed,
        )
        plan = optional("the accuracy budget", notes, search, plan)
    if sequential:
        # Last: it measures the network as it will be (final rounding, final float layers).
        start = time.perf_counter()
        correct = partial(
            correct_sequentially,
            *(model, index, plan, samples, config.batch_size, SEQUENTIAL_SAMPLES, progress),
            float_means,
        )
        corrected = optional("sequential bias correction", notes, correct, plan)
        if held and corrected is not plan:
            check = partial(_correction_pays, held_score, held, realize, notes, plan, corrected)
            corrected = optional("the correction check", notes, check, plan)
        plan = corrected
        seconds += time.perf_counter() - start
    return plan, seconds


def _best_method(
    model: onnx.ModelProto,
    held_reference: Callable[[], Reference],
    config: QuantConfig,
    held: int,
    observers: dict[str, Observer],
    unfit: dict[str, str],
    plan_for: Callable[[Fitted], Plan],
    notes: list[str],
) -> str:
    """`--method best`: each candidate method's ranges, fitted without the last `held`
    calibration samples, planned and scored per sample by the worst output part on those;
    the winner, and a note."""
    candidates = candidate_ranges(observers, unfit, config.activations)
    score = sample_scores(held_reference(), config.output_parts)
    method, scores, above, scored = choose_method(
        candidates, plan_for, partial(insert_qdq, model), score
    )
    first = next(iter(scores))
    shown = ", ".join(
        f"{m} {v:.2f}"
        + ("" if m == first else f" [above on {above[m]:.0%}]")
        + ("" if scored[m] == scored[first] else f" (out after {scored[m]})")
        for m, v in scores.items()
    )
    notes.append(
        f"range method {method}: median per-sample worst output part in dB on {held} calibration "
        f"samples held out of the ranges, and the share of them on which each scored above "
        f"{first} ({shown}); another replaces {first} only with a median more than {MARGIN} dB "
        f"higher and above it on at least {MAJORITY:.0%} of the samples; one that can no longer "
        f"reach that share is scored no further ('out after N': its median and share on N)"
    )
    return method


def _gptq_pays(
    held_score: Callable[[], Callable[[onnx.ModelProto], float]],
    held: int,
    plan: Plan,
    nearest: Callable[[], Plan],
    realize: Callable[[Plan], onnx.ModelProto],
    notes: list[str],
) -> bool:
    """Whether the plan with GPTQ's codes scores at least as well as with nearest rounding, by
    the worst output part on the last `held` calibration samples (`held_score`), which the
    ranges did not see nor, from 64 samples on, GPTQ's H (the first 32); a note either way.
    GPTQ fits each layer on float inputs and 32 samples: on NudeNet's YOLOv8n it cost its class
    scores a few tenths of a dB, and 4-6 points of F1 on two draws (docs/ptq.md)."""
    score = held_score()
    gptq, plain = score(realize(plan)), score(realize(nearest()))
    kept = "GPTQ" if gptq >= plain else "nearest"
    notes.append(
        f"weight rounding: {kept} (worst output part on {held} held-out calibration samples: "
        f"GPTQ {gptq:.2f} dB, nearest {plain:.2f} dB)"
    )
    return gptq >= plain


def _correction_pays(
    held_score: Callable[[], Callable[[onnx.ModelProto], float]],
    held: int,
    realize: Callable[[Plan], onnx.ModelProto],
    notes: list[str],
    plan: Plan,
    corrected: Plan,
) -> Plan:
    """`corrected` (the sequential bias correction's plan) where it scores at least as well as
    `plan` by the worst output part on the last `held` calibration samples (`held_score`), else
    `plan`; a note either way. The correction fits means on the first SEQUENTIAL_SAMPLES
    samples, which may include the held ones, so this catches harm, not overfitting:
    calibration once took the digits transformer's attention means from the wrong rows, and
    the correction cost it 25 dB where every earlier score had been 42-45 dB."""
    score = held_score()
    with_it, without = score(realize(corrected)), score(realize(plan))
    kept = "kept" if with_it >= without else "dropped"
    notes.append(
        f"sequential bias correction {kept} (worst output part on {held} held-out calibration "
        f"samples: with it {with_it:.2f} dB, without {without:.2f} dB)"
    )
    return corrected if with_it >= without else plan


def _by_content(score: Callable[[onnx.ModelProto], float]) -> Callable[[onnx.ModelProto], float]:
    """`score`, remembered per model content: the correction check scores again the plan the
    rounding check kept (a new session and the held-out samples again: 0.7 s of the check's
    1.6 s on ddddocr's detector)."""
    seen: dict[bytes, float] = {}

    def scored(candidate: onnx.ModelProto) -> float:
        key = hashlib.sha256(candidate.SerializeToString()).digest()
        if key not in seen:
            seen[key] = score(candidate)
        return seen[key]

    return scored


def _held(samples: Samples, config: QuantConfig) -> int:
    """Calibration samples `--method best` holds out to judge the methods: a quarter, at most
    CHOICE_SAMPLES; none (so percentile) under 8 samples or for an explicit method."""
    if config.method is not Method.BEST or samples.count < 8:
        return 0
    return min(CHOICE_SAMPLES, samples.count // 4)


def _frontier(
    model: onnx.ModelProto,
    samples: Samples,
    config: QuantConfig,
    decisions: dict[str, Decision],
    replan: Callable[[dict[str, Decision]], Plan],
    realize: Callable[[Plan], onnx.ModelProto],
    taken: TakenOutputs,
    notes: list[str],
    lstms: list[str],
) -> tuple[Plan, dict[str, Decision]]:
    """The candidate plan `config.prefer` takes (`qdq.plan.frontier`): each scored by the worst
    output part per sample on the first FRONTIER_SAMPLES calibration samples (FP32's outputs
    there as calibration `taken` them), at their lower quartile, timed on `timing_feed`; then
    its twin with the LSTMs `lstms` on int8 weights, a stage of its own that may fail alone."""
    feeds = _leading_batches(samples, config.batch_size, FRONTIER_SAMPLES)
    score = frontier_score(taken.reference(model, samples, 0, feeds), config.output_parts)
    feed, timed = timing_feed(model, samples)
    won = choose_plan(
        *(decisions, replan, realize, score, feed, config.prefer, model),
        Families.of(model),
        timed_samples=timed,
    )
    twin = partial(lstm_weights_int8, lstms, replan, realize, score, feed, config.prefer, model)
    return optional("int8 LSTM weights", notes, partial(twin, timed, *won), won)


def _untimed_twin(
    plan: Plan,
    decisions: dict[str, Decision],
    lstms: list[str],
    replan: Callable[[dict[str, Decision]], Plan],
    realize: Callable[[Plan], onnx.ModelProto],
) -> tuple[Plan, dict[str, Decision]]:
    """`--prefer int8`'s plan with the LSTMs `lstms` on int8 weights, untimed (none: `plan`),
    written once here, where a failure of the rewrite skips this stage alone."""
    if not lstms:
        return plan, decisions
    twin = replan(doubled := with_runtime_int8(decisions, lstms))
    realize(twin)
    return twin, doubled


def _session_score(metric: Metric) -> Callable[[onnx.ModelProto], float]:
    """A candidate model scored by the user's metric on its ONNX Runtime session."""

    def score(candidate: onnx.ModelProto) -> float:
        return float(metric(open_session(candidate)))

    return score


def _leading_batches(samples: Samples, batch_size: int, count: int) -> list[dict]:
    """The batches holding the first `count` samples (read lazily: no more than those)."""
    return list(samples.batches(batch_size, last=count))


def optional(stage: str, notes: list[str], run: Callable[[], T], fallback: T) -> T:
    """`run()`, or `fallback` where this optional stage fails on the model: a warning naming
    the stage and the reason, and a note for the report. Bad input (a QdqError) stays an
    error, and so do interrupts."""
    try:
        return run()
    except QdqError:
        raise
    except Exception as error:  # ONNX Runtime, NumPy and torch raise their own types
        reason = first_line(error)
        note = f"skipped {stage}: it failed on this model ({reason})"
        if note not in notes:  # a stage run once per candidate plan fails once per plan
            log.warning(note)
            notes.append(note)
        return fallback
