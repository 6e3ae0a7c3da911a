"""`qdq finetune`: label-free quantization-aware fine-tuning of an ONNX model.

The FP32 model is the teacher, its unlabelled calibration samples the data. PTQ runs first
(`quantize_model`: same rules, same Q/DQ placement, same ranges); `QdqGraph` turns its QDQ
graph into torch, and training moves the weights (straight-through estimator) and every scale
(LSQ) so that the int8 model's outputs match the teacher's (the loss: qdq.qat.finetune_loss;
the loop, its options and rates: qdq.qat.finetune_trainer). This module is the entry: it
checks the paths and the data, runs PTQ and training, and writes the learned values into the
PTQ file's initializers (`write_back`): the graph is the one `qdq quantize` wrote. Its report
gives ONNX Runtime's held-out SQNR before and after; where fine-tuning scored lower, the PTQ
model is written.
"""

from __future__ import annotations

import numbers
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import numpy_helper

from qdq.config import QuantConfig
from qdq.data import ImageOptions, Samples, model_inputs
from qdq.errors import DataError, ModelError, SchemeError, expect
from qdq.onnx.model import WEIGHTS_KEY, float_outputs, load_model, save_model
from qdq.onnx.sessions import Use, open_session, session_with_outputs
from qdq.outputs import check_output
from qdq.pipeline import prepare, quantize_model
from qdq.plan.part_stats import PartStats, update_all
from qdq.plan.parts import Part
from qdq.qat.finetune_loss import feature_tensors, softmax_axes
from qdq.qat.finetune_options import FinetuneOptions
from qdq.qat.finetune_trainer import Trainer
from qdq.qat.write import write_back
from qdq.report.summary import QuantizeReport

__all__ = ["FinetuneOptions", "FinetuneReport", "finetune_model"]

MIN_HELD_OUT, MAX_HELD_OUT = 8, 64
# A start whose weight codes' signs are this model's weights' signs less often is another
# model's (its own: 99-100%, GPTQ flipping a few near zero).
START_SIGNS = 0.8
CHOSEN = {  # how each `FinetuneOptions.checkpoint_by` picked the checkpoint, for the summary
    "loss": "the best held-out loss",
    "agreement": "the most held-out samples ranked as FP32 beyond their noise, else the least loss",
}


@dataclass
class FinetuneReport:
    """What fine-tuning did: the PTQ run it started from, and the held-out output SQNR of the
    PTQ model and of the fine-tuned one (ONNX Runtime, dB, per part of each float output)."""

    ptq: QuantizeReport | None  # None when started from a given PTQ model
    losses: dict[str, str]  # per output: "kl" or "mse"
    train_samples: int
    held_out_samples: int
    steps: int  # steps run
    best_step: int  # the checkpoint written (0: PTQ's values)
    seconds: float  # training and writing, PTQ not included
    ptq_seconds: float
    sqnr_before: dict[str, float] = field(default_factory=dict)
    sqnr_after: dict[str, float] = field(default_factory=dict)
    # the PTQ model was written: ONNX Runtime's held-out SQNR fell (by the loss), or PTQ's
    # held-out score beats the checkpoint's (by agreement)
    kept_ptq: bool = False
    checkpoint_by: str = "loss"  # `FinetuneOptions.checkpoint_by`
    # share of held-out samples ranked as FP32 at every position of every class output,
    # PTQ and the checkpoint (`HeldOut`); None without a class output
    agreement: tuple[float, float] | None = None

    def summary(self, output: str | os.PathLike[str]) -> str:
        """The PTQ summary, then what fine-tuning changed."""
        change = ", ".join(
            f"{name!r} {self.sqnr_before[name]:.2f} -> {self.sqnr_after[name]:.2f} dB"
            for name in self.sqnr_after
        )
        losses = ", ".join(f"{name!r} {kind}" for name, kind in self.losses.items())
        start = self.ptq.summary(output) if self.ptq else f"wrote {output}"
        kept = (
            "wrote the PTQ model: the fine-tuned one scored lower in ONNX Runtime on the "
            "held-out samples"
            if self.kept_ptq
            else f"kept step {self.best_step} ({CHOSEN[self.checkpoint_by]})"
        )
        ranked = (
            []
            if self.agreement is None
            else [
                f"held-out samples ranked as FP32 at every position of every class output, "
                f"PTQ -> fine-tuned: {self.agreement[0]:.1%} -> {self.agreement[1]:.1%}"
            ]
        )
        return "\n".join(
            [
                start,
                f"fine-tuned {self.steps} steps on {self.train_samples} samples in "
                f"{self.seconds:.1f} s (PTQ {self.ptq_seconds:.1f} s); losses: {losses}; {kept}",
                f"output SQNR against FP32 on {self.held_out_samples} held-out samples, "
                f"PTQ -> fine-tuned: {change}",
                *ranked,
            ]
        )


def finetune_model(
    model_path: str | os.PathLike[str],
    output_path: str | os.PathLike[str],
    calibration: str | os.PathLike[str],
    config: QuantConfig | None = None,
    options: FinetuneOptions | None = None,
    images: ImageOptions | None = None,
    seed: int | None = None,
    progress: bool = False,
    start: str | os.PathLike[str] | None = None,
) -> FinetuneReport:
    """Quantize `model_path` as `quantize_model` does, then fine-tune the result to match the
    FP32 model on the samples in `calibration` (no labels), and write it to `output_path` in
    the same QDQ format. Checks the output path and the data before any work.

    `start`: a QDQ model `quantize_model` already wrote from this model with this `config`,
    fine-tuned instead of quantizing again (PTQ's choice between candidate plans times them,
    so two PTQ runs on a busy machine can pick different plans)."""
    path = (str, os.PathLike)
    for what, value in (("model_path", model_path), ("output_path", output_path)):
        expect(value, path, what)
    expect(calibration, path, "calibration", "a .npz file or a folder of samples")
    expect(start, (*path, type(None)), "start")
    expect(
        config, (QuantConfig, type(None)), "config", "e.g. qdq.config.QuantConfig(method='minmax')"
    )
    expect(options, (FinetuneOptions, type(None)), "options", "e.g. FinetuneOptions(steps=100)")
    expect(images, (ImageOptions, type(None)), "images", "e.g. qdq.images.ImageOptions()")
    expect(seed, (numbers.Integral, type(None)), "seed")
    config = config or QuantConfig()  # quantize's plan: a better start than all int8 (docs)
    options = options or FinetuneOptions()
    if config.data_free:
        raise SchemeError("finetune learns from calibration data; drop `data_free`")
    target = check_output(output_path, [model_path, calibration, start])
    model = load_model(model_path)
    if not float_outputs(model):
        kinds = {o.name: onnx.TensorProto.DataType.Name(o.type.tensor_type.elem_type)
                 for o in model.graph.output}  # fmt: skip
        raise DataError(
            f"{model_path} has no float32 output ({kinds}) for fine-tuning to match with "
            "FP32's; quantize it with `qdq quantize` instead"
        )
    unknown = sorted(set(options.class_logits) - set(float_outputs(model)))
    if unknown:
        raise DataError(
            f"`class_logits` names {unknown}, which are not float outputs of {model_path}; "
            f"its float outputs: {float_outputs(model)}"
        )
    ranks = {o.name: len(o.type.tensor_type.shape.dim) for o in model.graph.output}
    known = {o.name for o in model.graph.output if o.type.tensor_type.HasField("shape")}
    classless = sorted(n for n in options.class_logits if n in known and ranks[n] < 2)
    if classless:  # before any work; an output of unknown rank is checked on its first batch
        raise DataError(
            f"`class_logits` names {classless}, of rank {[ranks[n] for n in classless]}: class "
            "logits lie along an output's last axis after its batch axis; leave these out"
        )
    softmaxes = [n for n, a in softmax_axes(model, float_outputs(model)).items() if a is not None]
    if options.checkpoint_by == "agreement" and not softmaxes + list(options.class_logits):
        raise DataError(
            f"`checkpoint_by` 'agreement' counts samples ranked as FP32 on class outputs, and "
            f"{model_path} has none that a Softmax makes; name its logits in `class_logits` "
            f"(its float outputs: {float_outputs(model)})"
        )
    samples = Samples(calibration, model_inputs(model), config.max_samples, images, seed)
    held_out = _held_out_count(samples.count, options.held_out)
    threads = torch.get_num_threads()
    if options.threads is not None:
        torch.set_num_threads(options.threads)
    try:
        with tempfile.TemporaryDirectory(prefix="qdq-finetune-") as folder:
            begin, ptq = time.perf_counter(), None
            if start is None:
                start = Path(folder) / "ptq.onnx"
                ptq = quantize_model(model_path, start, calibration, config, images, seed, progress)
            ptq_seconds, begin = time.perf_counter() - begin, time.perf_counter()
            quantized = load_model(start)
            if ptq is None:
                _check_start(model, quantized, config, start)
            features = feature_tensors(model, quantized) if options.feature_weight else []
            teacher = session_with_outputs(model, features) if features else open_session(model)
            trainer = Trainer(quantized, teacher, samples, config, options, held_out, seed)
            best_step, steps = trainer.train(progress)
            first, kept = trainer.scores
            tuned = write_back(quantized, trainer.graph, trainer.pairs)
            session = open_session(tuned, Use.CHECK)
            ptq_session = open_session(quantized, Use.CHECK)
            before = _output_sqnr(teacher, ptq_session, trainer.held, trainer.parts)
            after = _output_sqnr(teacher, session, trainer.held, trainer.parts)
            # the torch copy rounds a few ties unlike ONNX Runtime: its loss can fall while the
            # file's error rises, and the user should never get a model worse than PTQ's; by
            # agreement, PTQ's file where it beats the checkpoint (each checkpoint kept beat
            # the last within the noise band, so a chain of them can drift below PTQ's share)
            if options.checkpoint_by == "loss":
                kept_ptq = min(after.values(), default=0.0) < min(before.values(), default=0.0)
            else:
                kept_ptq = first.beats(kept, options.checkpoint_by)
            save_model(quantized if kept_ptq else tuned, target)
    finally:
        torch.set_num_threads(threads)
    return FinetuneReport(
        ptq=ptq,
        losses=trainer.losses,
        train_samples=trainer.training.count,
        held_out_samples=held_out,
        steps=steps,
        best_step=best_step,
        seconds=time.perf_counter() - begin,
        ptq_seconds=ptq_seconds,
        sqnr_before=before,
        sqnr_after=after,
        kept_ptq=kept_ptq,
        checkpoint_by=options.checkpoint_by,
        agreement=None
        if first.agreement is None
        else (first.agreement, (first if kept_ptq else kept).agreement),
    )


def _held_out_count(count: int, asked: int | None) -> int:
    if count < 2:
        raise DataError(
            f"finetune needs at least 2 calibration samples (some are held out), got {count}"
        )
    if asked is None:
        return min(max(count // 8, MIN_HELD_OUT), MAX_HELD_OUT, count // 2)
    if asked >= count:
        raise DataError(f"`held_out` {asked} leaves no training samples of {count}")
    return asked


def _check_start(
    model: onnx.ModelProto, quantized: onnx.ModelProto, config: QuantConfig, start: object
) -> None:
    """A ModelError unless `quantized` holds every node of `model` as qdq prepares it, with
    the same inputs and outputs: a start quantized from another model was trained to mimic
    this one and written as its fine-tuned copy; and a QDQ file on `config`'s weight grid."""
    ops = {n.op_type for n in quantized.graph.node}
    if "QuantizeLinear" not in ops or any(op.startswith("QLinear") for op in ops):
        raise ModelError(
            f"`start` {start} is not a QDQ file; give the one `qdq quantize` writes by default "
            "(--format qdq)"
        )
    recorded = {p.key: p.value for p in quantized.metadata_props}.get(WEIGHTS_KEY)
    if recorded is not None and recorded != config.weight_record:
        raise ModelError(
            f"`start` {start} holds {recorded} weights but the config asks for "
            f"{config.weight_record}; give the config it was quantized with"
        )
    prepared = prepare(model, config.per_channel)[0]
    missing = {n.name for n in prepared.graph.node} - {n.name for n in quantized.graph.node}
    if missing or _ends(prepared) != _ends(quantized):
        raise ModelError(
            f"`start` {start} was not quantized from this model ({len(missing)} of its nodes "
            "missing, or other inputs or outputs); give the file `qdq quantize` wrote from it"
        )
    agree = _signs_agree(prepared, quantized)
    if agree < START_SIGNS:
        raise ModelError(
            f"`start` {start} was not quantized from this model's weights (the signs of "
            f"{1 - agree:.0%} of its weight codes are not this model's: another checkpoint of "
            "the same network?); give the file `qdq quantize` wrote from it"
        )


def _signs_agree(prepared: onnx.ModelProto, quantized: onnx.ModelProto) -> float:
    """The share of `quantized`'s nonzero weight codes whose sign is `prepared`'s float
    weight's, over the layers both hold (1 with none). Positive per-channel rescaling
    (smoothing, equalization) keeps a sign; GPTQ flips only some near zero; a start from
    other weights of the same graph had been trained as this model's (-30.9 dB)."""
    floats = {t.name: t for t in prepared.graph.initializer}
    codes = {t.name: t for t in quantized.graph.initializer}
    made = {o: n for n in quantized.graph.node for o in n.output}
    by_name = {n.name: n for n in quantized.graph.node}
    agree = total = 0
    for node in prepared.graph.node:
        other = by_name.get(node.name)
        if len(node.input) < 2 or node.input[1] not in floats or other is None:
            continue
        dq = made.get(other.input[1]) if len(other.input) > 1 else None
        if dq is None or dq.op_type != "DequantizeLinear" or dq.input[0] not in codes:
            continue
        q = numpy_helper.to_array(codes[dq.input[0]]).astype(np.int64)
        w = numpy_helper.to_array(floats[node.input[1]])
        zero = len(dq.input) > 2 and dq.input[2] in codes
        if q.shape != w.shape or (zero and numpy_helper.to_array(codes[dq.input[2]]).any()):
            continue
        nonzero = q != 0
        agree += int(np.count_nonzero(np.sign(q[nonzero]) == np.sign(w[nonzero])))
        total += int(np.count_nonzero(nonzero))
    return agree / total if total else 1.0


def _ends(model: onnx.ModelProto) -> tuple[list[str], list[str]]:
    """The names of a model's inputs (initializers aside) and outputs."""
    constants = {t.name for t in model.graph.initializer}
    inputs = [i.name for i in model.graph.input if i.name not in constants]
    return inputs, [o.name for o in model.graph.output]


def _output_sqnr(
    teacher: ort.InferenceSession,
    session: ort.InferenceSession,
    samples: Samples,
    parts: dict[str, list[Part]],
) -> dict[str, float]:
    """Per part of each float output, `session`'s SQNR (dB) against the teacher on
    `samples`, by the part's label (the output's name when it is one part)."""
    names = list(parts)
    stats = {name: [PartStats(part) for part in parts[name]] for name in names}
    for feed in samples.batches(16):
        wanted = teacher.run(names, feed)
        by_name = dict(zip(names, wanted, strict=True))
        for name, want, got in zip(names, wanted, session.run(names, feed), strict=True):
            update_all(stats[name], want, got, by_name)
    return {s.part.label: s.error.sqnr_db for group in stats.values() for s in group}
