"""`qdq compare`: how far a quantized model's outputs and layers are from the float model's."""

from __future__ import annotations

import math
import numbers
import os
import pickle
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

from qdq.data import Samples, model_inputs
from qdq.errors import DataError, expect
from qdq.images import ImageOptions
from qdq.metrics import REPORT_BLOCK, ErrorStats, measurable, nonfinite_notes
from qdq.onnx.model import check_outputs_readable, load_model, model_bytes
from qdq.onnx.sessions import fails_on_data, session_with_outputs
from qdq.plan.calibrate import budgeted
from qdq.plan.part_stats import PartStats, part_stats, update_all
from qdq.plan.parts import Part, output_parts
from qdq.plan.readings import Readings, decision_outputs
from qdq.report.checks import (
    LeadingOutputs,
    check_classes,
    check_same_inputs,
    leading_outputs,
    read_labels,
)
from qdq.report.jsonout import strict_json
from qdq.report.latency import batch_latency, latency_ratio
from qdq.report.pairing import quantized_tensor_floors, quantized_tensor_pairs
from qdq.report.summary import size_change
from qdq.workers import ONE_PROCESS, Workers

PART_SAMPLES = 16  # leading samples whose FP32 outputs find each output's parts (qdq.plan.parts)
# Batches per evaluation shard (a fixed count: results depend on the data alone, whether one
# process measures the shards or many workers).
EVAL_SHARD_BATCHES = 8
# The most bytes of tensors (both models' outputs and paired tensors) one evaluation batch holds.
EVAL_BUDGET = 256 * 2**20


@dataclass
class Comparison:
    """Per output, per part of an output that joins quantities (a detector's boxes and scores),
    and per quantized tensor error; accuracies when labels are given."""

    outputs: dict[str, ErrorStats]
    layers: dict[str, ErrorStats]
    samples: int
    sizes: tuple[int, int]
    latency_ms: tuple[float, float] | None = None
    batch_latency_ms: tuple[int, float, float] | None = None  # batch size, ms per batch each
    sequence: bool = False  # that "batch" is a run of steps of one sequence (Samples.sequence)
    accuracy: tuple[float, float] | None = None
    extra: dict[str, object] = field(default_factory=dict)
    parts: dict[str, PartStats] = field(default_factory=dict)  # by label: split, gated outputs
    notes: list[str] = field(default_factory=list)  # how the data was read (Samples.read_notes)
    readings: dict[str, Readings] = field(default_factory=dict)  # per output of decisions

    def as_dict(self) -> dict[str, object]:
        worst = sorted(self.layers.items(), key=_worst_first)
        out: dict[str, object] = {
            "samples": self.samples,
            "notes": self.notes,
            "size_bytes": {"float": self.sizes[0], "quantized": self.sizes[1]},
            "outputs": {k: {**self.output_stats(k), **self._read(k)} for k in self.outputs},
            "parts": {k: v.as_dict() for k, v in self.parts.items()},
            "layers": [{"tensor": k, "sqnr_db": v.sqnr_db} for k, v in worst],
        }
        if self.accuracy:
            out["accuracy"] = {"float": self.accuracy[0], "quantized": self.accuracy[1]}
        if self.latency_ms:
            out["latency_ms"] = {"float": self.latency_ms[0], "quantized": self.latency_ms[1]}
        if self.batch_latency_ms:
            batch, f, q = self.batch_latency_ms
            out["batch_latency_ms"] = {"batch": batch, "float": f, "quantized": q}
            out["batch_latency_ms"]["sequence"] = self.sequence
        return out

    def to_json(self) -> str:
        return strict_json(self.as_dict())

    def batch_label(self) -> str:
        """What `batch_latency_ms` timed: 'batch 32', or '128 steps in one run'."""
        count = self.batch_latency_ms[0] if self.batch_latency_ms else 0
        return f"{count} steps in one run" if self.sequence else f"batch {count}"

    def output_stats(self, name: str) -> dict[str, float | None]:
        """An output's error; its class agreement only where it holds one quantity (split, its
        top-1 would take an argmax across a detector's boxes and scores)."""
        out = self.outputs[name].as_dict()
        split = any(p.part.output == name and p.part.axis is not None for p in self.parts.values())
        return {k: v for k, v in out.items() if not k.startswith("top")} if split else out

    def _read(self, output: str) -> dict[str, float | None]:
        """An output of decisions' share of samples read as FP32 reads them, if it is one."""
        reading = self.readings.get(output)
        return {} if reading is None else {"read_alike": reading.share}

    def to_text(self, top: int = 15) -> str:
        lines = [*self.notes, f"{self.samples} samples"]
        if self.accuracy:
            f, q = self.accuracy
            lines.append(
                f"accuracy      FP32 {f:.2%}   INT8 {q:.2%}   ({(q - f) * 100:+.2f} points)"
            )
        f_size, q_size = self.sizes
        lines.append(
            f"size          FP32 {f_size / 1e3:.1f} kB   INT8 {q_size / 1e3:.1f} kB   "
            f"({size_change(f_size, max(q_size, 1))})"
        )
        if self.latency_ms:
            f, q = self.latency_ms
            lines.append(
                f"latency       FP32 {f:.3f} ms   INT8 {q:.3f} ms   ({f / q:.2f}x speed-up, "
                "1 thread, batch 1, median)"
            )
        if self.batch_latency_ms:
            _, f, q = self.batch_latency_ms
            lines.append(
                f"              FP32 {f:.3f} ms   INT8 {q:.3f} ms   ({f / q:.2f}x speed-up, "
                f"1 thread, {self.batch_label()}, median)"
            )
        for name, stats in self.outputs.items():
            d = self.output_stats(name)
            if "batches_of_another_shape" in d:
                lines.append(
                    f"output {name!r}: of another shape than FP32's on {stats.unmatched} batches "
                    "(its size is set by the data), left out of its numbers"
                )
                if stats.blank:
                    continue  # no batch of its own shape: no numbers to give
            if "equal_share" in d:  # integers (a label): how often they are FP32's is the news
                text = f"output {name!r}: equal to FP32's at {d['equal_share']:.2%} of its "
                text += f"{stats.values} values (integers: SQNR {d['sqnr_db']:.2f} dB)"
            else:
                text = f"output {name!r}: SQNR {d['sqnr_db']:.2f} dB, cosine {d['cosine']:.6f}, "
                text += f"max abs error {d['max_abs_error']:.4g}"
            if "top1_agreement" in d:
                text += f", top-1 {d['top1_agreement']:.2%}, top-5 {d['top5_agreement']:.2%}"
            if name in self.readings:
                text += f"; {self.readings[name].as_text()}"
            lines.append(text)
        for label, part in self.parts.items():
            d = part.as_dict()
            if d["sqnr_db"] is None:  # every batch of another shape: its output's line says so
                continue
            text = f"  part {label!r} ({part.part.kind}): SQNR {d['sqnr_db']:.2f} dB"
            if "batches_of_another_shape" in d:
                text += f" ({d['batches_of_another_shape']} batches of another shape left out)"
            if "top1_agreement" in d:
                text += f", top-1 {d['top1_agreement']:.2%} of confident positions"
            if "detection_f1" in d:
                text += f", F1 of FP32's detections {d['detection_f1']:.3f}"
            lines.append(text)
        if self.layers:
            lines.append(
                f"per-layer SQNR, worst first ({min(top, len(self.layers))} of {len(self.layers)}):"
            )
            worst = sorted(self.layers.items(), key=_worst_first)[:top]
            lines.extend(f"  {s.sqnr_db:8.2f} dB  {name}" for name, s in worst)
        return "\n".join(lines)


def compare_models(
    float_path: str | os.PathLike[str],
    quantized_path: str | os.PathLike[str],
    data: str | os.PathLike[str],
    labels: str | None = "label",
    batch_size: int = 32,
    max_samples: int | None = None,
    latency_runs: int = 30,
    workers: Workers = ONE_PROCESS,
    declared: Sequence[str] = (),
    images: ImageOptions | None = None,
) -> Comparison:
    """Run both models on the same samples, streaming, and measure the differences: shards of
    EVAL_SHARD_BATCHES batches (on `workers` when parallel), merged in sample order. Outputs
    that join quantities are also measured per part, found on the first PART_SAMPLES samples
    or `declared` (`--output-parts` specs). A folder of pictures is read with `images`, as
    `qdq quantize` reads its calibration folder."""
    for what, value in (("float_path", float_path), ("quantized_path", quantized_path)):
        expect(value, (str, os.PathLike), what, "save a ModelProto with onnx.save first")
    expect(data, (str, os.PathLike), "data", "a .npz file or a folder of samples")
    expect(images, (ImageOptions, type(None)), "images", "e.g. qdq.images.ImageOptions()")
    for what, value, least in (("batch_size", batch_size, 1), ("latency_runs", latency_runs, 0)):
        expect(value, numbers.Integral, f"`{what}`")
        if value < least:
            raise DataError(f"`{what}` must be >= {least}, got {value} (latency_runs 0: untimed)")
    if isinstance(declared, str):  # iterated, it declared one part per character
        raise DataError(f"`declared` is a list of part specs: write [{declared!r}]")
    reference, quantized = load_model(float_path), load_model(quantized_path)
    for model, path in ((reference, float_path), (quantized, quantized_path)):
        check_outputs_readable(model, path)
    check_same_inputs(reference, quantized)
    samples = Samples(data, model_inputs(reference), max_samples, images)
    truth = read_labels(data, labels, samples)
    leading = leading_outputs(reference, samples, PART_SAMPLES)
    check_classes(truth, reference, labels, leading)
    pairs = quantized_tensor_pairs(quantized, reference)
    floors = quantized_tensor_floors(quantized, pairs)
    parts = _parts(leading, declared)
    decided = decision_outputs(*leading)
    job = _Job(reference, quantized, pairs, floors, samples, batch_size, parts, decided)
    step = EVAL_SHARD_BATCHES * batch_size
    spans = [(a, min(a + step, samples.count)) for a in range(0, samples.count, step)]
    if workers.parallel:
        seen = _merged(workers.map(_open, _measure, job, spans))
    else:  # in this process, with its sessions and data handles
        opened = _open(job, reopen=False)
        seen = _merged([_measure(opened, span) for span in spans])
    out_stats, layer_stats, predictions, parts, readings = seen
    accuracy = _accuracy(truth, predictions)
    notes = samples.read_notes(read_elsewhere=[labels] if truth is not None else [])
    notes += nonfinite_notes(out_stats)
    if not pairs and any(n.op_type.startswith(("QLinear", "QGemm")) for n in quantized.graph.node):
        notes.append(  # a QOperator file: int8 codes between its ops, no dequantized copies
            "no per-layer table: the INT8 model is a QOperator file, whose tensors between "
            "layers are int8 codes with no dequantized copy to pair with FP32's; compare the "
            "QDQ file `qdq quantize` writes by default for it"
        )
    if truth is not None and accuracy is None:  # they had been read, and dropped silently
        notes.append(
            f"{data}: the {labels!r} labels were not scored: the first output is no (batch, "
            "classes) scores with a row per sample"
        )
    first = next(samples.batches(1))
    latency = latency_ratio(float_path, quantized_path, first, latency_runs)
    batched, sequence = batch_latency(
        float_path, quantized_path, reference, samples, batch_size, latency, latency_runs
    )
    return Comparison(
        outputs=out_stats,
        layers=layer_stats,
        samples=samples.count,
        sizes=(model_bytes(float_path), model_bytes(quantized_path)),
        latency_ms=latency,
        batch_latency_ms=batched,
        sequence=sequence,
        accuracy=accuracy,
        parts={s.part.label: s for group in parts.values() for s in group},
        notes=notes,
        readings=readings,
    )


@dataclass(frozen=True)
class _Job:
    """What every evaluation shard needs: sent once per worker."""

    reference: onnx.ModelProto
    quantized: onnx.ModelProto
    pairs: dict[str, str]
    floors: dict[str, float]  # paired tensors measured from their grid's floor
    samples: Samples
    batch_size: int
    parts: dict[str, list[Part]]  # of the outputs that split or are gated
    decided: dict[str, int | None]  # outputs of decisions, with their CTC blank (readings.py)


# Per output and per paired tensor, the error sums; the top-1 predictions, batch by batch; per
# split output, its parts' statistics; per output of decisions, the samples read alike.
_Seen = tuple[
    dict[str, ErrorStats],
    dict[str, ErrorStats],
    list[tuple[np.ndarray, np.ndarray]],
    dict[str, list[PartStats]],
    dict[str, Readings],
]


def _parts(leading: LeadingOutputs, declared: Sequence[str]) -> dict[str, list[Part]]:
    """The parts of each float output that splits or is gated (`qdq.plan.parts`), from FP32's
    outputs on the leading samples."""
    found = output_parts(*leading, declared)
    return {name: parts for name, parts in found.items() if parts != [Part(name)]}


def _open(job: _Job, reopen: bool = True) -> tuple[_Job, Any, Any, Samples]:
    """Both sessions, and the worker's own handles on the data."""
    samples = pickle.loads(pickle.dumps(job.samples)) if reopen else job.samples
    ref_session = session_with_outputs(job.reference, job.pairs)
    q_session = session_with_outputs(job.quantized, job.pairs.values())
    return job, ref_session, q_session, samples


def _measure(opened: tuple[_Job, Any, Any, Samples], span: tuple[int, int]) -> _Seen:
    """Both models on samples `span` (first, last), batch by batch."""
    job, ref_session, q_session, samples = opened
    pairs = job.pairs
    outputs = [o.name for o in job.reference.graph.output]
    out_stats = {name: ErrorStats() for name in outputs}
    layer_stats = {name: ErrorStats() for name in pairs}
    predictions: list[tuple[np.ndarray, np.ndarray]] = []
    parts = {name: part_stats(p) for name, p in job.parts.items()}
    readings = {name: Readings(blank) for name, blank in job.decided.items()}
    for ref, got in _runs(job, ref_session, q_session, samples, span):
        by_name = dict(zip(outputs, ref, strict=False))  # the paired tensors follow
        for i, name in enumerate(outputs):
            if not measurable(ref[i]):  # strings, sequences: no error to measure
                out_stats.pop(name, None)
                continue
            if ref[i].shape != got[i].shape:  # NonZero's, an NMS's: a count set by the data
                out_stats[name].unmatched += 1
                update_all(parts.get(name, ()), ref[i], got[i], by_name)  # they count it too
                continue
            out_stats[name].update(ref[i], got[i], REPORT_BLOCK)
            if name in parts:
                update_all(parts[name], ref[i], got[i], by_name)
            if name in readings:
                readings[name].update(ref[i], got[i])
        for j, name in enumerate(pairs, start=len(outputs)):
            want, have = ref[j], got[j]
            if name in job.floors:  # what the flat reader makes of both is the same below it
                want, have = np.maximum(want, job.floors[name]), np.maximum(have, job.floors[name])
            layer_stats[name].update(want, have, REPORT_BLOCK)
        scored = outputs[0] in out_stats and out_stats[outputs[0]].classes
        if scored and ref[0].shape == got[0].shape:  # rows an NMS sets: `_accuracy` checks
            predictions.append((ref[0].argmax(axis=1), got[0].argmax(axis=1)))
    return out_stats, layer_stats, predictions, parts, readings


def _runs(
    job: _Job, ref_session: Any, q_session: Any, samples: Samples, span: tuple[int, int]
) -> Iterator[tuple[list[np.ndarray], list[np.ndarray]]]:
    """Both sessions' outputs and paired tensors, batch by batch over `span`: its first sample
    alone, to size the batches after it so that both models' tensors of one batch stay within
    EVAL_BUDGET (a CNN's every layer output at 224 x 224 is hundreds of MB per sample). The
    batches depend on the data and the models only, never on the workers."""
    outputs = [o.name for o in job.reference.graph.output]
    size = 1
    first = span[0]
    while first < span[1]:
        last = min(first + size, span[1])
        for feed in samples.batches(size, first=first, last=last):
            with fails_on_data("the float model on the data"):
                ref = ref_session.run([*outputs, *job.pairs], feed)
            got = q_session.run([*outputs, *job.pairs.values()], feed)
            yield ref, got
        if first == span[0]:  # sized by the first sample's tensors
            size = budgeted(
                job.batch_size, sum(getattr(v, "nbytes", 0) for v in (*ref, *got)), EVAL_BUDGET
            )
        first = last


def _merged(shards: list[_Seen]) -> _Seen:
    """The shards' sums added in sample order (maxima taken, predictions concatenated)."""
    outputs, layers, predictions, parts, readings = shards[0]
    for shard_outputs, shard_layers, shard_predictions, shard_parts, shard_reads in shards[1:]:
        for into, more in ((outputs, shard_outputs), (layers, shard_layers)):
            for name, stats in into.items():
                into[name] = stats.merged(more[name])
        predictions += shard_predictions
        for name, group in parts.items():
            parts[name] = [a.merged(b) for a, b in zip(group, shard_parts[name], strict=True)]
        for name, reading in readings.items():
            readings[name] = reading.merged(shard_reads[name])
    return outputs, layers, predictions, parts, readings


def _worst_first(item: tuple[str, ErrorStats]) -> tuple[bool, float]:
    """Layers by SQNR, lowest first and NaN last (a NaN key had left the order undefined)."""
    sqnr = item[1].sqnr_db
    return math.isnan(sqnr), sqnr


def _accuracy(
    truth: np.ndarray | None, predictions: list[tuple[np.ndarray, np.ndarray]]
) -> tuple[float, float] | None:
    if truth is None or not predictions:
        return None
    ref = np.concatenate([p[0] for p in predictions])
    got = np.concatenate([p[1] for p in predictions])
    if len(ref) != len(truth):  # its rows are not the samples (detections an NMS kept)
        return None
    return float((ref == truth).mean()), float((got == truth).mean())
