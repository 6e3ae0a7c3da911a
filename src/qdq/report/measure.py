"""Everything the HTML report draws, measured on two models and a data set."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import onnx

from qdq.data import Samples, model_inputs
from qdq.images import ImageOptions
from qdq.metrics import REPORT_BLOCK, ErrorStats, measurable
from qdq.observers import Histogram
from qdq.onnx.model import load_model
from qdq.onnx.sessions import session_with_outputs
from qdq.plan.calibrate import budgeted
from qdq.plan.decisions import Decision
from qdq.plan.recurrent import RUNTIME_INT8
from qdq.report.compare import EVAL_BUDGET, Comparison, compare_models
from qdq.report.pairing import WEIGHTS_ONLY
from qdq.report.profile import op_times_ms
from qdq.report.ranges import (
    ActivationView,
    WeightView,
    activation_view,
    quantized_activations,
    weight_views,
)
from qdq.report.sensitivity import layer_sensitivity
from qdq.report.summary import QuantizeReport
from qdq.workers import ONE_PROCESS, Workers

QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")
# a QOperator file's integer kernels: by prefix, and by name
INTEGER_KERNELS = ("QLinear", "QGemm")
INTEGER_OPS = ("MatMulInteger", "ConvInteger", "MatMulIntegerToFloat", "DynamicQuantizeMatMul")
TOP = 12  # activations and weights drawn unless all are asked for: the worst ones
PROFILE_RUNS = 20
STREAM_BATCH = 16  # samples per batch of the per-layer pass, where its tensors fit EVAL_BUDGET


@dataclass(frozen=True)
class LayerRow:
    """One node of the INT8 model: its decision, and the SQNR of its output against FP32."""

    node: str
    op_type: str
    quantized: bool
    reason: str
    sqnr_db: float | None
    sensitivity_db: float | None = None  # output SQNR gain when this layer alone reads float
    weights_only: bool = False  # int8 weights, activations quantized as it runs (an LSTM's)


@dataclass
class ReportData:
    """What `write_report` draws."""

    title: str
    comparison: Comparison
    layers: list[LayerRow]
    activations: list[ActivationView]
    weights: list[WeightView]
    op_times: tuple[dict[str, float], dict[str, float]]  # FP32, INT8: ms per run per op type
    hidden: dict[str, int] = field(default_factory=dict)  # charts left out, per section
    # quantized activations the FP32 model does not compute (SmoothQuant's X / s): no histogram
    undrawn: int = 0
    run: QuantizeReport | None = None  # the run that wrote the INT8 model (quantize --report)


def measure(
    float_path: str | os.PathLike[str],
    quantized_path: str | os.PathLike[str],
    data: str | os.PathLike[str],
    decisions: list[Decision] | None = None,
    max_samples: int | None = None,
    everything: bool = False,
    sensitivity: bool = False,
    workers: Workers = ONE_PROCESS,
    images: ImageOptions | None = None,
    declared: Sequence[str] = (),
) -> ReportData:
    """Compare the models as `qdq compare` does, then measure per layer: output SQNR, the
    histogram of each quantized activation (FP32 values), weight ranges and time per op type.

    `decisions` (from the quantization run) give each node's reason; without them a node is
    int8 when Q/DQ surround it in the INT8 model. Unless `everything`, only the TOP worst
    activations (lowest SQNR) and weights (widest channel spread) are kept. The comparison
    runs on `workers`; `declared` are `--output-parts` specs, as `qdq compare` takes them.
    """
    comparison = compare_models(
        float_path, quantized_path, data, max_samples=max_samples, workers=workers,
        images=images, declared=declared,
    )  # fmt: skip
    reference, quantized = load_model(float_path), load_model(quantized_path)
    samples = Samples(data, model_inputs(reference), max_samples, images)
    sqnr, histograms = _stream(reference, quantized, samples)
    chosen = quantized_activations(quantized)
    # Worst first: the KL and MSE searches run only on the activations drawn.
    tensors = sorted(histograms, key=lambda t: sqnr.get(t, np.inf))
    keep = len(tensors) if everything else TOP
    views = [
        replace(activation_view(t, histograms[t], chosen[t]), sqnr_db=sqnr.get(t))
        for t in tensors[:keep]
    ]
    weights = sorted(weight_views(quantized), key=lambda w: -w.spread)
    layers = _layers(quantized, decisions, sqnr)
    if sensitivity:
        feeds = list(samples.batches(8, last=16))
        gains = layer_sensitivity(
            reference, quantized, [r.node for r in layers if r.quantized], feeds
        )
        layers = [replace(r, sensitivity_db=gains.get(r.node)) for r in layers]
    first = next(samples.batches(1))
    times = (
        op_times_ms(float_path, first, PROFILE_RUNS),
        op_times_ms(quantized_path, first, PROFILE_RUNS),
    )
    return ReportData(
        title=f"{Path(float_path).name} -> {Path(quantized_path).name}",
        comparison=comparison,
        layers=layers,
        activations=views,
        weights=weights if everything else weights[:TOP],
        op_times=times,
        hidden={
            "activations": len(tensors) - len(views),
            "weights": 0 if everything else max(0, len(weights) - TOP),
        },
        undrawn=len([t for t in chosen if t not in histograms and t not in _computed(reference)]),
    )


def _stream(
    reference: onnx.ModelProto, quantized: onnx.ModelProto, samples: Samples
) -> tuple[dict[str, float], dict[str, Histogram]]:
    """Per float tensor of the INT8 model that the FP32 model also computes: its SQNR (INT8
    against FP32), and the FP32 histogram of each tensor a QuantizeLinear reads."""
    names = _computed(reference)
    computed = [o for n in quantized.graph.node if n.op_type not in QDQ_OPS for o in n.output[:1]]
    compared = [_float_name(o) for o in computed if _float_name(o) in names]
    drawn = [t for t in quantized_activations(quantized) if t in names]
    ref_names = list(dict.fromkeys(compared + drawn))
    q_names = [o for o in computed if _float_name(o) in names]
    ref_session = session_with_outputs(reference, ref_names)
    q_session = session_with_outputs(quantized, q_names)
    stats = {name: ErrorStats() for name in compared}
    histograms = {name: Histogram() for name in drawn}

    # One sample's tensors size the batches (every tensor of both models, 16 samples at a time,
    # took PP-OCRv6's detector's 320 x 320 pages to an 11 GB peak); it is measured again in the
    # first batch, so where 16 samples fit, the batches, and so the histograms, are as before.
    first = next(samples.batches(1))
    captured = [*ref_session.run(ref_names, first), *q_session.run(q_names, first)]
    per_sample = sum(v.nbytes for v in captured if isinstance(v, np.ndarray))  # not sequences
    del captured
    for feed in samples.batches(budgeted(STREAM_BATCH, per_sample, EVAL_BUDGET)):
        want = dict(zip(ref_names, ref_session.run(ref_names, feed), strict=True))
        got = q_session.run(q_names, feed)
        for name, value in zip(compared, got, strict=True):
            if measurable(want[name]):  # a string or sequence tensor has no error to measure
                stats[name].update(want[name], value, REPORT_BLOCK)
            else:
                stats.pop(name, None)
        for name, hist in histograms.items():
            if want[name].size and np.isfinite(want[name]).all():
                hist.update(want[name])
    return {k: s.sqnr_db for k, s in stats.items()}, {k: h for k, h in histograms.items() if h.seen}


def _computed(model: onnx.ModelProto) -> set[str]:
    """The tensors `model` computes or takes."""
    return {o for n in model.graph.node for o in n.output} | {i.name for i in model.graph.input}


def _float_name(tensor: str) -> str:
    """The FP32 name of an INT8 model's tensor (a quantized graph output keeps its name on the
    dequantized copy and its float original gets this suffix)."""
    return tensor.removesuffix("_prequant")


def _layers(
    quantized: onnx.ModelProto, decisions: list[Decision] | None, sqnr: dict[str, float]
) -> list[LayerRow]:
    """One row per computing node of the INT8 model, in graph order: int8 when it has Q/DQ on
    both sides, or on one where the run decided int8 (or no decision is known); when it is an
    integer kernel of a QOperator file; or when all it reads are such a kernel's codes."""
    given = {d.node: d for d in decisions or []}
    dequantized = {n.output[0] for n in quantized.graph.node if n.op_type == "DequantizeLinear"}
    quantizing = {n.input[0] for n in quantized.graph.node if n.op_type == "QuantizeLinear"}
    constants = {i.name for i in quantized.graph.initializer}
    codes: set[str] = set()  # integer tensors between a QOperator file's kernels
    rows = []
    for node in quantized.graph.node:
        if node.op_type in QDQ_OPS:
            codes.update(node.output if node.op_type == "QuantizeLinear" else ())
            continue
        decision = given.get(node.name)
        reads = any(i in dequantized for i in node.input)
        feeds = any(o in quantizing for o in node.output)
        read = [i for i in node.input if i and i not in constants]
        kernel = node.op_type.startswith(INTEGER_KERNELS) or node.op_type in INTEGER_OPS
        on_codes = not kernel and bool(read) and all(i in codes for i in read)
        if _writes_codes(node) or on_codes:
            codes.update(node.output)
        one_side_counts = decision is None or decision.quantized
        seen = kernel or on_codes or (reads and feeds) or ((reads or feeds) and one_side_counts)
        weights_only = node.op_type in WEIGHTS_ONLY
        if kernel:
            reason = "an int8 kernel in the INT8 model (a QOperator file)"
        elif on_codes:
            reason = "int8 codes flow through it (a QOperator file)"
        elif weights_only:  # no Q/DQ around it, so not `seen`; inspect_model's decision is float
            reason = decision.reason if decision is not None and decision.dynamic else RUNTIME_INT8
        else:
            reason = _reason(decision, seen, reads, feeds)
        output = sqnr.get(_float_name(node.output[0])) if node.output else None
        rows.append(
            LayerRow(node.name, node.op_type, seen, reason, output, weights_only=weights_only)
        )
    return rows


def _writes_codes(node: onnx.NodeProto) -> bool:
    """Whether a QOperator file's `node` outputs 8-bit codes: a QLinear op, or a QGemm given
    an output scale (without one it outputs float, as MatMulIntegerToFloat and
    DynamicQuantizeMatMul do; MatMulInteger's and ConvInteger's are int32 sums)."""
    if node.op_type == "QGemm":
        return len(node.input) > 7 and bool(node.input[7])
    return node.op_type.startswith("QLinear")


def _reason(decision: Decision | None, seen: bool, reads: bool, feeds: bool) -> str:
    """The decision's reason where the INT8 model bears it out; else what the model shows."""
    if decision is not None and decision.quantized == seen:
        return "int8 flows into it" if decision.reason.startswith("pending") else decision.reason
    if decision is not None and decision.quantized:
        return "kept float after calibration (a range unfit for int8, or the accuracy budget)"
    if not seen:
        return "no Q/DQ around it in the INT8 model"
    if reads and feeds:
        return "Q/DQ around it in the INT8 model"
    if reads:
        return "reads int8 (a DequantizeLinear) in the INT8 model"
    return "feeds a QuantizeLinear in the INT8 model"
