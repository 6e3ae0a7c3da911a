"""quantize_model: load, check data, prepare, plan (qdq.ptq), rewrite, verify, save."""

from __future__ import annotations

import logging
import numbers
import os
import time
from functools import partial
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from qdq.config import OutputFormat, Placement, QuantConfig
from qdq.data import ImageOptions, Samples, model_inputs
from qdq.errors import DataError, ModelError, UsageError, choice, expect
from qdq.metrics import nonfinite_notes
from qdq.onnx.graph import (
    GraphIndex,
    constants_to_initializers,
    dequantized_constants,
    hoisted_duplicates,
)
from qdq.onnx.model import (
    check_quantizable,
    load_model,
    model_bytes,
    optimize,
    ort_rewrite,
    save_model,
)
from qdq.onnx.opset import PER_AXIS_OPSET, default_opset, upgrade_opset
from qdq.onnx.repair import check_model, declare_shapes, declared_shapes, ranked
from qdq.onnx.sessions import Use, fails_on_data, open_session
from qdq.outputs import check_output
from qdq.passes.branches import (
    Inlined,
    inline_decided,
    inlined_names,
    outputs_kept,
    rewrapped,
)
from qdq.passes.datafree import batchnorm_moments, plan_data_free
from qdq.passes.decided import decided_from, exposed, hidden
from qdq.passes.equalize import equalize
from qdq.passes.fuse import fold_affine, fuse_hard_swish, sum_before_layer_norm
from qdq.passes.insert_qdq import free_reserved_names, insert_qdq
from qdq.passes.smooth import smooth
from qdq.passes.unfuse import split_summed_gemms, unfuse, wanted_opset
from qdq.passes.widen import HALF, narrowed, widen
from qdq.plan.build import BudgetResult
from qdq.plan.decisions import Decision, folded_exclusions, static_decisions
from qdq.plan.part_stats import PartStats, judged
from qdq.plan.parts import check_declared, output_parts
from qdq.plan.readings import Readings, decision_outputs
from qdq.plan.saturation import avoids_saturation
from qdq.ptq import BUDGET_SAMPLES, Metric, optional, plan_model
from qdq.report.summary import CHECK_SAMPLES, QuantizeReport, task_scores

log = logging.getLogger(__name__)


def prepare(model: onnx.ModelProto, per_channel: bool) -> tuple[onnx.ModelProto, bool, list[str]]:
    """A float16 model widened (`qdq.passes.widen`), ONNX Runtime's own fused ops unfused
    (`qdq.passes.unfuse`), the opset upgraded where per-channel weights need it, ORT's basic
    rewrites (BatchNorm folding), Constant nodes as initializers, every node named. Returns
    whether per-channel weights are possible, and notes for the user."""
    model, widened = widen(model)
    notes = []
    wanted = wanted_opset(model)
    if wanted and default_opset(upgraded := upgrade_opset(model, wanted)) >= wanted:
        notes.append(
            f"upgraded opset {default_opset(model)} to {wanted} to write ONNX Runtime's "
            "SkipLayerNormalization as the LayerNormalization it fuses"
        )
        model = upgraded
    model, unfused = unfuse(model)
    if widened:
        notes.append(
            f"widened the float16 model to float32 ({widened} constants) to quantize it; its "
            "inputs and outputs keep their types"
        )
    if unfused:
        kinds = ", ".join(f"{count} {op}" for op, count in unfused.items())
        notes.append(
            f"rewrote ONNX Runtime's fused ops ({kinds}) as the ONNX ops they fuse, which "
            "int8 rules know (ONNX Runtime fuses the quantized graph again)"
        )
    if per_channel and default_opset(model) < PER_AXIS_OPSET:
        model = upgrade_opset(model)
        if default_opset(model) < PER_AXIS_OPSET:
            per_channel = False
            notes.append(
                f"opset {default_opset(model)} could not be upgraded to 13, so weights are "
                "quantized per tensor (per-axis DequantizeLinear needs opset 13)"
            )
    model = constants_to_initializers(optimize(model))
    split_summed_gemms(model)  # a residual sum fused into a Gemm keeps it float
    folded = dequantized_constants(model)
    if folded:
        notes.append(
            f"folded {folded} DequantizeLinear nodes of constant weights into the float weights "
            "they compute, to quantize those layers again on qdq's grids"
        )
    renamed = free_reserved_names(model)
    if renamed:
        notes.append(f"renamed {renamed} tensors named as the tensors qdq adds (x_scale beside x)")
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
    path = (str, os.PathLike)
    expect(model_path, path, "model_path", "save a ModelProto with onnx.save first")
    expect(output_path, path, "output_path")
    expect(calibration, (*path, type(None)), "calibration", "a .npz file or a folder of samples")
    expect(
        config, (QuantConfig, type(None)), "config", "e.g. qdq.config.QuantConfig(method='minmax')"
    )
    expect(seed, (numbers.Integral, type(None)), "seed")
    expect(images, (ImageOptions, type(None)), "images", "e.g. qdq.images.ImageOptions()")
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
    interface = declared_shapes(model)  # kept so in the file
    if not config.data_free:
        samples = Samples(calibration, model_inputs(model), config.max_samples, images, seed)
        ranked(model, {name: x.ndim for name, x in next(samples.batches(1)).items()})
    prepared, per_channel, notes = prepare(model, config.per_channel)
    decided = decided_from(prepared)  # judged as outputs where the model has no float one
    if decided:
        prepared = exposed(prepared, decided)
        notes.append(
            "no float32 output: the float tensors its outputs are decided from ("
            + ", ".join(map(repr, decided))
            + ") are judged as its outputs would be; the file has the model's own outputs"
        )
    known = {name for node in prepared.graph.node for name in (node.name, node.op_type)}
    known |= inlined_names(prepared.graph)
    named = {name for node in model.graph.node for name in (node.name, node.op_type)}
    unknown = [name for name in config.exclude if name not in known | named]
    if unknown:  # as the CLI's --exclude check, for callers of this function
        raise UsageError(f"`exclude` {unknown} names no node or op type of the model")
    notes += folded_exclusions(prepared, config.exclude, known)
    branches: list[Inlined] = []
    if not config.data_free and not decided:
        prepared, branches = inline_decided(prepared, samples, config.batch_size, config.exclude)
    if branches:  # the branches' nodes, prepared as the rest were
        own = {o.name for o in prepared.graph.output}
        added = [name for b in branches for name in b.types if name not in own]
        prepared, per_channel, _ = prepare(outputs_kept(prepared, branches), per_channel)
        prepared = hidden(prepared, added)
        notes.append(
            f"planned the ops inside {len(branches)} If nodes as the branch each takes on every "
            "calibration sample (written back as Ifs; their other branches stay float)"
        )
    if not config.data_free:
        notes[:0] = samples.read_notes()
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
    half = [o.name for o in model.graph.output if o.type.tensor_type.elem_type == HALF]
    quantized = narrowed(quantized, half)  # a float16 model's outputs, as it wrote them
    declare_shapes(quantized, interface)
    if avoids_saturation(config) and any(d.quantized for d in plan.decisions.values()):
        notes.append(
            "weight scales raised where two neighbouring products could overflow the 16-bit sums "
            "of int8 kernels on x86 without VNNI (--saturation; docs/quantization.md §20)"
        )
    if config.placement is Placement.ORT:  # TensorRT fuses the residual Add itself
        quantized, summed = sum_before_layer_norm(quantized)
    quantized = rewrapped(quantized, branches)
    hoisted_duplicates(quantized)
    if summed:
        notes.append(
            f"wrote {summed} float Adds before a LayerNorm as Sum, which ONNX Runtime runs "
            "faster than its fused SkipLayerNormalization"
        )
    if output_format is OutputFormat.QOPERATOR:  # ONNX Runtime's own fusion of our QDQ groups
        quantized = ort_rewrite(quantized, ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED)
        declare_shapes(quantized, interface)  # the rewrite infers the shapes again
    written = hidden(quantized, decided)  # the model's own outputs only
    session = _check_loads(written)
    checked, readings = [], {}
    if not config.data_free:
        checking = open_session(quantized, Use.CHECK) if decided else session
        checked, readings = _output_check(exposed(model, decided), checking, samples, config)
    # everything the report says is measured before the file is written: a failure here
    # had left the model behind under "nothing was written"
    output_sqnr = {s.part.label: s.error.sqnr_db for s in checked}
    output_tasks = {s.part.label: task_scores(s) for s in checked if task_scores(s)}
    output_rows = {s.part.label: s.agreement_rows for s in checked if s.agreement_rows}
    if plan.budget is not None:  # with calibration data
        notes += _budget_notes(plan.budget, samples.count)
    notes += nonfinite_notes({s.part.label: s.error for s in checked})
    resized = {s.part.output: s.error.unmatched for s in checked if s.error.unmatched}
    notes += [
        f"output {name!r}: of another size than FP32's on {count} of the check's batches (its "
        "size is set by the data, as an NMS's), left out of its SQNR"
        for name, count in resized.items()
    ]
    save_model(written, target)
    return QuantizeReport(
        decisions=list(plan.decisions.values()),
        samples=0 if config.data_free else samples.count,
        calibration_seconds=seconds,
        float_bytes=model_bytes(source),
        quantized_bytes=target.stat().st_size,
        notes=notes,
        output_sqnr=output_sqnr,
        output_tasks=output_tasks,
        output_rows=output_rows,
        candidates=list(plan.frontier),
        float_ms=plan.float_ms,
        readings=readings,
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
) -> tuple[list[PartStats], dict[str, Readings]]:
    """Per part of each float output (`qdq.plan.parts`), the `quantized` session's error against
    `model` on the first CHECK_SAMPLES calibration samples, and of each output of decisions (a
    recognizer's text, `qdq.plan.readings`) the samples it reads as FP32 does: what the report
    says the quantization cost."""
    reference = open_session(model, Use.CHECK)
    floats = ("tensor(float)", "tensor(float16)")  # a float16 model's, compared as float32
    names = [o.name for o in reference.get_outputs() if o.type in floats]
    if not names:  # nothing to compare (asked for none, ONNX Runtime would return them all)
        return [], {}
    feeds = list(samples.batches(1, last=CHECK_SAMPLES))
    with fails_on_data("the float model on the calibration samples"):
        want = [_wide(reference.run(names, feed)) for feed in feeds]
    got = []
    for feed in feeds:
        try:
            got.append(_wide(quantized.run(names, feed)))
        except Exception as error:  # ORT raises its own types
            raise RuntimeError(  # not bad input: the CLI exits 1 and logs the traceback
                f"the quantized model fails on a calibration sample ({error}); "
                "nothing was written. Please report it with the model, and use --exclude on "
                "the node it names meanwhile"
            ) from None
    readings = {}
    for name, blank in decision_outputs(names, want).items():
        i = names.index(name)
        readings[name] = Readings(blank)
        for ours, theirs in zip(want, got, strict=True):
            readings[name].update(ours[i], theirs[i])
    return judged(output_parts(names, want, config.output_parts), want, got), readings


def _wide(values: list[np.ndarray]) -> list[np.ndarray]:
    """A float16 model's outputs as float32, as its quantized file was planned and checked."""
    return [v.astype(np.float32) if v.dtype == np.float16 else v for v in values]


def _budget_notes(budget: BudgetResult, samples: int) -> list[str]:
    met = "met" if budget.sqnr_after >= budget.target else "NOT met (every candidate is float)"
    kept = ", ".join(budget.kept_float) or "none"
    notes = [
        f"target {budget.target:g} {met}: score {budget.sqnr_before:.2f} -> "
        f"{budget.sqnr_after:.2f} (output SQNR in dB unless a metric was given) on the first "
        f"{min(BUDGET_SAMPLES, samples)} calibration samples; kept float: {kept}"
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
        model, smoothed = optional("smoothing", notes, run, (model, {}))
    if smoothed:
        exponents = ", ".join(f"{a:g}" for a in smoothed.values())
        notes.append(
            f"moved the outlier channels of {len(smoothed)} MatMul or Conv inputs into their "
            f"weights (SmoothQuant, exponent per layer: {exponents})"
        )
    return model, time.perf_counter() - start


def _check_loads(model: onnx.ModelProto) -> ort.InferenceSession:
    """The quantized model's session, once ONNX's checker and ONNX Runtime accept it."""
    try:
        check_model(model)
        return open_session(model, Use.CHECK)
    except Exception as error:  # ORT raises its own types
        raise RuntimeError(  # not bad input: the CLI exits 1 and logs the traceback
            f"the quantized model does not load ({error}); nothing was written. "
            "Please report it with the model, and use --exclude on the node it names meanwhile"
        ) from None
