"""quantize_model: load, check data, prepare, calibrate, plan, rewrite, verify, save."""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Callable
from dataclasses import replace
from functools import cache, partial
from pathlib import Path
from typing import TypeVar

import numpy as np
import onnx
import onnxruntime as ort

from qdq.config import OutputFormat, Placement, Prefer, QuantConfig
from qdq.data import ImageOptions, Samples, model_inputs
from qdq.errors import DataError, ModelError, QdqError, choice, first_line
from qdq.lowbit import WeightGrid
from qdq.observers import Method, Observer, make_observer
from qdq.onnx.graph import GraphIndex, constants_to_initializers
from qdq.onnx.model import (
    PER_AXIS_OPSET,
    check_quantizable,
    default_opset,
    load_model,
    optimize,
    ort_rewrite,
    save_model,
    upgrade_opset,
)
from qdq.onnx.sessions import Use, open_session
from qdq.outputs import check_output
from qdq.passes.adaround import learn_rounding
from qdq.passes.bias_correction import (
    correct_biases,
    correct_sequentially,
    correctable_outputs,
    correction_inputs,
)
from qdq.passes.datafree import Moments, batchnorm_moments, mean_samples, propagate
from qdq.passes.equalize import equalize
from qdq.passes.fuse import fold_affine, fuse_hard_swish, sum_before_layer_norm
from qdq.passes.gptq import SAMPLES as GPTQ_SAMPLES
from qdq.passes.gptq import hessians, linear_layers, rounded_codes
from qdq.passes.insert_qdq import insert_qdq
from qdq.passes.smooth import smooth
from qdq.plan.budget import Reference, float_reference, meet_target, sqnr_score
from qdq.plan.build import Plan, build_plan
from qdq.plan.calibrate import fit_ranges, observe_holding
from qdq.plan.decisions import Decision, kept_float, static_decisions
from qdq.plan.flow import Int8Flow
from qdq.plan.frontier import choose_plan
from qdq.plan.layout import SLOW_POOL, slow_pools
from qdq.plan.method import (
    Fitted,
    candidate_ranges,
    choose_method,
    method_ranges,
    sample_scores,
)
from qdq.plan.parts import PartStats, check_declared, judged, output_parts
from qdq.plan.saturation import avoids_saturation, summed_inputs
from qdq.report.summary import CHECK_SAMPLES, QuantizeReport, task_scores

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


def prepare(model: onnx.ModelProto, per_channel: bool) -> tuple[onnx.ModelProto, bool, list[str]]:
    """Opset upgraded where per-channel weights need it, ORT's basic rewrites (BatchNorm
    folding), Constant nodes as initializers, every node named. Returns whether per-channel
    weights are possible, and notes for the user."""
    notes = []
    if per_channel and default_opset(model) < PER_AXIS_OPSET:
        model = upgrade_opset(model)
        if default_opset(model) < PER_AXIS_OPSET:
            per_channel = False
            notes.append(
                f"opset {default_opset(model)} could not be upgraded to 13, so weights are "
                "quantized per tensor (per-axis DequantizeLinear needs opset 13)"
            )
    model = constants_to_initializers(optimize(model))
    seen: set[str] = set()
    for i, node in enumerate(model.graph.node):
        if not node.name or node.name in seen:
            node.name = f"{node.op_type}_{i}"
        seen.add(node.name)
    model, fused = fuse_hard_swish(model)
    if fused:
        notes.append(f"rewrote {fused} written-out HardSwish as x * HardSigmoid(x)")
    model, folded = fold_affine(model)
    if folded:
        notes.append(f"folded {folded} constant Mul/Add into the preceding Conv")
    return model, per_channel, notes


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
    held = _held(samples, config)
    # FP32's outputs on the held-out samples, computed once for the method choice and the checks
    held_reference = cache(partial(_held_reference, model, samples, config, held))
    held_score = cache(lambda: _by_content(sqnr_score(held_reference(), config.output_parts)))
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
    )
    # a model input's channels (an image's brightness) vary most beyond the samples: any code
    peaks = {n: averages[n].peak for n in paired if n in averages and n not in index.graph_inputs}
    ranges, unfit = fit_ranges({name: o.compute() for name, o in observers.items()}, unfit)
    means_of = {name: average.mean for name, average in averages.items()}
    learned: dict[tuple[str, int], np.ndarray] = {}
    layers = linear_layers(index, quantizable) if config.gptq else []
    found: dict[str, np.ndarray] = {}
    if layers:
        feeds = _leading_batches(samples, config.batch_size, GPTQ_SAMPLES)
        gather = partial(hessians, model, index, layers, feeds)
        found = _optional("GPTQ rounding", notes, gather, {})
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
        return _optional(
            "bias correction",
            notes,
            partial(correct_biases, index, plan, means_of, corrections),
            plan,
        )

    if held:
        choose = partial(_best_method, model, held_reference, config, held, apart, unfit)
        choose = partial(choose, partial(replan, decisions), notes)
        method = _optional("the method choice", notes, choose, "percentile")
        grid = config.activations
        ranges, unfit = method_ranges(observers, unfit, grid, method)
    plan = replan(decisions)
    slow = _optional("the layout probe", notes, partial(slow_pools, plan, realize), [])
    if slow:
        decisions = kept_float(decisions, slow, SLOW_POOL)
        plan = replan(decisions)
    # A low-bit grid the user asked for goes on every layer the rules allow: keeping layers
    # float is then --target-sqnr's or --exclude's job, not a latency trade.
    uniform = config.weights.bits == 8 and config.weight_grid is WeightGrid.UNIFORM
    timed = uniform and config.prefer is not Prefer.INT8
    if config.target_sqnr is None and config.placement is Placement.ORT and timed:
        frontier = partial(_frontier, model, samples, config, decisions, replan, realize)
        plan, decisions = _optional("latency-aware planning", notes, frontier, (plan, decisions))
    if found and held:
        nearest = partial(replan, decisions, rounding=False)
        check = partial(_gptq_pays, held_score, held, plan, nearest, realize, notes)
        if not _optional("the rounding check", notes, check, True):
            found.clear()  # `rounded` reads it: this and every later re-plan round to nearest
            plan = replace(replan(decisions), frontier=plan.frontier, float_ms=plan.float_ms)
    if config.adaround:
        feeds = _leading_batches(samples, config.batch_size, ADAROUND_SAMPLES)
        learned.update(
            _optional("AdaRound", notes, partial(learn_rounding, model, index, plan, feeds), {})
        )
        plan = replace(replan(decisions), frontier=plan.frontier, float_ms=plan.float_ms)
    seconds = time.perf_counter() - start
    if config.target_sqnr is not None:
        feeds = _leading_batches(samples, config.batch_size, BUDGET_SAMPLES)
        score = (
            sqnr_score(float_reference(model, feeds), config.output_parts, reuse=True)
            if metric is None
            else _session_score(metric)
        )
        search = partial(
            meet_target,
            *(decisions, replan, realize, score, config.target_sqnr, _timing_feed(samples)),
            config.workers,
        )
        plan = _optional("the accuracy budget", notes, search, plan)
    if sequential:
        # Last: it measures the network as it will be (final rounding, final float layers).
        start = time.perf_counter()
        correct = partial(
            correct_sequentially,
            *(model, index, plan, samples, config.batch_size, SEQUENTIAL_SAMPLES, progress),
            float_means,
        )
        corrected = _optional("sequential bias correction", notes, correct, plan)
        if held and corrected is not plan:
            check = partial(_correction_pays, held_score, held, realize, notes)
            check = partial(check, plan, corrected)
            corrected = _optional("the correction check", notes, check, plan)
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
    method, scores = choose_method(candidates, plan_for, partial(insert_qdq, model), score)
    shown = ", ".join(f"{m} {v:.2f}" for m, v in scores.items())
    notes.append(
        f"range method {method}: the best median per-sample worst output part in dB on {held} "
        f"calibration samples held out of the ranges ({shown})"
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


def _held_reference(
    model: onnx.ModelProto, samples: Samples, config: QuantConfig, held: int
) -> Reference:
    """FP32's outputs on the last `held` calibration samples, which candidates are judged on."""
    feeds = list(samples.span(samples.count - held, samples.count).batches(config.batch_size))
    return float_reference(model, feeds)


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
) -> tuple[Plan, dict[str, Decision]]:
    """The candidate plan `config.prefer` takes (`qdq.plan.frontier`): each scored by the worst
    output part on the first FRONTIER_SAMPLES calibration samples, timed on the first one."""
    feeds = _leading_batches(samples, config.batch_size, FRONTIER_SAMPLES)
    score = sqnr_score(float_reference(model, feeds), config.output_parts)
    return choose_plan(
        decisions, replan, realize, score, _timing_feed(samples), config.prefer, model
    )


def plan_data_free(
    model: onnx.ModelProto, config: QuantConfig, per_channel: bool, moments: dict[str, Moments]
) -> Plan:
    """The plan from BatchNorm statistics alone: ranges and expected inputs (for analytical
    bias correction) propagated through the graph from `config.input_range`."""
    index = GraphIndex(model)
    decisions = static_decisions(index, config)
    everything = propagate(index, moments, config.input_range)
    ranges, unfit = {}, {}
    for name in Int8Flow(index, decisions, config).calibration_targets():
        if name in everything:
            ranges[name] = everything[name].range()
        else:
            unfit[name] = "has no statistics without data (no BatchNorm or input upstream)"
    plan = build_plan(index, decisions, ranges, unfit, config, per_channel)
    if config.bias_correction:
        quantizable = [name for name, d in decisions.items() if d.quantized]
        expected = mean_samples(index, everything, correction_inputs(index, quantizable))
        plan = correct_biases(index, plan, expected)
    return plan


def _session_score(metric: Metric) -> Callable[[onnx.ModelProto], float]:
    """A candidate model scored by the user's metric on its ONNX Runtime session."""

    def score(candidate: onnx.ModelProto) -> float:
        return float(metric(open_session(candidate)))

    return score


def _timing_feed(samples: Samples) -> dict[str, np.ndarray]:
    """The first sample, which the frontier's candidates and the budget's price are timed on
    (the budget timed a batch before: a serial tail of seconds on two workers, docs/ptq.md)."""
    return next(samples.batches(1))


def _leading_batches(samples: Samples, batch_size: int, count: int) -> list[dict]:
    """The batches holding the first `count` samples (read lazily: no more than those)."""
    return list(samples.batches(batch_size, last=count))


def quantize_model(
    model_path: str | os.PathLike[str],
    output_path: str | os.PathLike[str],
    calibration: str | os.PathLike[str] | None,
    config: QuantConfig | None = None,
    images: ImageOptions | None = None,
    seed: int | None = None,
    progress: bool = False,
    output_format: OutputFormat | str = OutputFormat.QDQ,
    metric: Metric | None = None,
) -> QuantizeReport:
    """Quantize an FP32 ONNX model into a QDQ model that ONNX Runtime runs with int8 kernels.

    Validates everything (model, data against the model's inputs, output path) before any
    work; writes nothing unless the quantized model loads in ONNX Runtime and runs on the
    first calibration samples.
    """
    config = config or QuantConfig()
    output_format = choice(OutputFormat, output_format, "format")
    if calibration is None and not config.data_free:
        raise DataError("no calibration data: give `calibration`, or `data_free`")
    if calibration is not None and config.data_free:
        raise DataError("`data_free` uses no calibration data; drop `calibration` or `data_free`")
    source, target = Path(model_path), check_output(output_path, [model_path, calibration])
    model = load_model(source)
    check_quantizable(model, source)
    check_declared(config.output_parts, [o.name for o in model.graph.output])
    moments = batchnorm_moments(model)  # read before preparation folds the BatchNorms
    if config.data_free and not moments:
        raise ModelError(
            f"{source} has no BatchNormalization layers, whose statistics "
            "`data_free` needs; calibrate with `calibration` instead"
        )
    if not config.data_free:
        samples = Samples(calibration, model_inputs(model), config.max_samples, images, seed)
    prepared, per_channel, notes = prepare(model, config.per_channel)
    if config.equalize or config.data_free:
        prepared, equalized = equalize(prepared, moments)
        moments = equalized.moments
        notes.append(
            f"cross-layer equalization rescaled {len(equalized.divided)} conv pairs "
            f"({equalized.capped_pairs} across ReLU6, within its cap); bias absorption "
            f"shifted {len(equalized.absorbed)}"
        )
    if config.data_free:
        plan, seconds = plan_data_free(prepared, config, per_channel, moments), 0.0
    else:
        prepared, smoothing_seconds = _smoothed(prepared, samples, config, notes)
        plan, seconds = plan_model(prepared, samples, config, per_channel, progress, notes, metric)
        seconds += smoothing_seconds
    quantized, summed = insert_qdq(prepared, plan), 0
    if avoids_saturation(config) and any(d.quantized for d in plan.decisions.values()):
        notes.append(
            "weight scales raised where two neighbouring products could overflow the 16-bit sums "
            "of int8 kernels on x86 without VNNI (--saturation; docs/quantization.md §20)"
        )
    if config.placement is Placement.ORT:  # TensorRT fuses the residual Add itself
        quantized, summed = sum_before_layer_norm(quantized)
    if summed:
        notes.append(
            f"wrote {summed} float Adds before a LayerNorm as Sum, which ONNX Runtime runs "
            "faster than its fused SkipLayerNormalization"
        )
    if output_format is OutputFormat.QOPERATOR:  # ONNX Runtime's own fusion of our QDQ groups
        quantized = ort_rewrite(quantized, ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED)
    session = _check_loads(quantized)
    checked = [] if config.data_free else _output_check(model, session, samples, config)
    save_model(quantized, target)
    return QuantizeReport(
        decisions=list(plan.decisions.values()),
        samples=0 if config.data_free else samples.count,
        calibration_seconds=seconds,
        float_bytes=source.stat().st_size,
        quantized_bytes=target.stat().st_size,
        notes=notes + _budget_notes(plan),
        output_sqnr={s.part.label: s.error.sqnr_db for s in checked},
        output_tasks={s.part.label: task_scores(s) for s in checked if task_scores(s)},
        candidates=list(plan.frontier),
        float_ms=plan.float_ms,
    )


def inspect_model(
    model_path: str | os.PathLike[str], config: QuantConfig | None = None
) -> list[Decision]:
    """Per node of the prepared model: whether it would be quantized, and why not if not.

    Decisions that need data (masks, Concat ranges, shape ops following their input) show as
    pending here; `quantize_model`'s report gives the final ones.
    """
    config = config or QuantConfig()
    prepared, _, _ = prepare(load_model(model_path), config.per_channel)
    return list(static_decisions(GraphIndex(prepared), config).values())


def _output_check(
    model: onnx.ModelProto, quantized: ort.InferenceSession, samples: Samples, config: QuantConfig
) -> list[PartStats]:
    """Per part of each float output (`qdq.plan.parts`), the `quantized` session's error against
    `model` on the first CHECK_SAMPLES calibration samples: what the report says the
    quantization cost."""
    reference = open_session(model, Use.CHECK)
    names = [o.name for o in reference.get_outputs() if o.type == "tensor(float)"]
    feeds = list(samples.batches(1, last=CHECK_SAMPLES))
    want = [reference.run(names, feed) for feed in feeds]
    got = []
    for feed in feeds:
        try:
            got.append(quantized.run(names, feed))
        except Exception as error:  # ORT raises its own types
            raise RuntimeError(  # not bad input: the CLI exits 1 and logs the traceback
                f"the quantized model fails on a calibration sample ({error}); "
                "nothing was written. Please report it with the model, and use --exclude on "
                "the node it names meanwhile"
            ) from None
    return judged(output_parts(names, want, config.output_parts), want, got)


def _budget_notes(plan: Plan) -> list[str]:
    budget = plan.budget
    if budget is None:
        return []
    met = "met" if budget.sqnr_after >= budget.target else "NOT met (every candidate is float)"
    kept = ", ".join(budget.kept_float) or "none"
    notes = [
        f"target {budget.target:g} {met}: score {budget.sqnr_before:.2f} -> "
        f"{budget.sqnr_after:.2f} (output SQNR in dB unless a metric was given) on the first "
        f"{BUDGET_SAMPLES} calibration samples; kept float: {kept}"
    ]
    if budget.latency_ms:
        int8, budgeted = budget.latency_ms
        notes.append(
            f"cost of the float layers: {budgeted:.3f} ms vs {int8:.3f} ms all-int8 "
            f"per sample ({budgeted / int8:.2f}x), 1 thread"
        )
    return notes


def _smoothed(
    model: onnx.ModelProto, samples: Samples, config: QuantConfig, notes: list[str]
) -> tuple[onnx.ModelProto, float]:
    """SmoothQuant where it lowers a layer's error (unless turned off); returns the model and
    the seconds it took, and says in `notes` what moved."""
    start = time.perf_counter()
    smoothed: dict[str, float] = {}
    if config.smoothing:
        run = partial(smooth, model, samples, config)
        model, smoothed = _optional("smoothing", notes, run, (model, {}))
    if smoothed:
        exponents = ", ".join(f"{a:g}" for a in smoothed.values())
        notes.append(
            f"moved the outlier channels of {len(smoothed)} MatMul inputs into their weights "
            f"(SmoothQuant, exponent per layer: {exponents})"
        )
    return model, time.perf_counter() - start


def _optional(stage: str, notes: list[str], run: Callable[[], T], fallback: T) -> T:
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


def _check_loads(model: onnx.ModelProto) -> ort.InferenceSession:
    """The quantized model's session, once ONNX's checker and ONNX Runtime accept it."""
    try:
        onnx.checker.check_model(model)
        return open_session(model, Use.CHECK)
    except Exception as error:  # ORT raises its own types
        raise RuntimeError(  # not bad input: the CLI exits 1 and logs the traceback
            f"the quantized model does not load ({error}); nothing was written. "
            "Please report it with the model, and use --exclude on the node it names meanwhile"
        ) from None
