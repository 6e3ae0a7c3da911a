"""`qdq finetune`: label-free quantization-aware fine-tuning of an ONNX model.

The FP32 model is the teacher, its unlabelled calibration samples the data. PTQ runs first
(`quantize_model`: same rules, same Q/DQ placement, same ranges); `QdqGraph` turns its QDQ
graph into torch, and training moves the weights (straight-through estimator) and every scale
(LSQ) so that the int8 model's outputs match the teacher's:

- an output a Softmax makes is a distribution: KL(teacher || student) over the Softmax axis
  (also behind a reshape that keeps a last Softmax axis last, checked on the teacher's outputs);
- any other output (logits, regression maps, boxes, embeddings): the squared error over the
  teacher's power, sum (s - t)^2 / sum t^2, which is 10^(-SQNR/10): minimizing it maximizes
  that output's SQNR. MSE on logits distils at least as well as KL on them (Kim et al. 2021).
  An output that joins different quantities (a YOLO head's [boxes | class scores]: the parts
  `qdq.plan.parts` finds, or `QuantConfig.output_parts` declares) gets that error per part,
  summed, so that scores in [0, 1] weigh as much as boxes in pixels (as one tensor, the boxes'
  error is all the loss sees; issue 15's lesson for PTQ).

A random eighth of the samples (8 to 64) is held out: the loss on them, measured every
`evaluate_every` steps from step 0 (the PTQ model itself), picks the checkpoint written and
stops training after `patience` evaluations without a gain in the second half of the run (the
loss often stalls while the cosine-decayed rate is high, then falls: docs/finetune.md). It is
measured in ONNX Runtime on the file each checkpoint would write, not on the torch copy: the
two round a few ties apart, and on a model that amplifies noise (PP-OCRv4's recognizer: ONNX
Runtime's fused and unfused runs of one QDQ file differ by 23 dB) the torch loss fell by half
while the file's error barely moved (docs/finetune.md). Each training step's loss is the
file's too (`FinetuneOptions.file_outputs`), with the torch copy's gradient. Each batch is
the next `batch_size` of the training samples in an order shuffled every pass (a folder of
images sorted by class would otherwise give batches of one class, and a held-out set of the
last), read from the samples as training draws them, so memory does not grow with their
number. The learned values go back into the PTQ file's initializers (`write_back`): the
graph is the one `qdq quantize` wrote.

Adam's steps are set per tensor in units of that tensor's own grid, so one `lr` suits every
layer and bit width: a weight moves up to `lr` of its grid step per step, a scale or a bias
`lr / 10` of its own size (a scale moves the whole grid, so it moves slower). Adam moves every
weight about `lr` per step whatever its gradient's size, so with a few samples per batch a high
rate is noise added to every weight: 0.01 suits the digits CNN (batch 16), but made the
PP-OCRv4 recognizer's and detector's held-out loss rise from the first evaluation, where 0.002
lowered it (docs/finetune.md).
"""

from __future__ import annotations

import copy
import logging
import math
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from tqdm import tqdm

from qdq.config import QuantConfig
from qdq.data import ImageOptions, Samples, model_inputs
from qdq.errors import DataError, SchemeError
from qdq.onnx.model import load_model, save_model
from qdq.onnx.sessions import Use, open_session
from qdq.outputs import check_output
from qdq.pipeline import quantize_model
from qdq.plan.parts import Part, PartStats, output_parts, update_all
from qdq.plan.saturation import avoids_saturation
from qdq.qat.convert import QdqGraph, write_back
from qdq.report.summary import QuantizeReport

log = logging.getLogger(__name__)
SCALE_LR_SHARE = 0.1  # scales and biases move at this share of `lr` (see the module doc)
MIN_HELD_OUT, MAX_HELD_OUT = 8, 64
PART_SAMPLES = 16  # training samples whose teacher outputs find each output's parts
PASS_THROUGH = {"QuantizeLinear", "DequantizeLinear", "Identity"}
# Ops that regroup the other axes and may keep a Softmax's last axis last (PP-OCRv4's
# recognizer reshapes its (N * T, classes) Softmax to (N, T, classes)); the teacher's outputs
# confirm it (`_confirmed`).
RESHAPES = {"Reshape", "Flatten", "Squeeze", "Unsqueeze"}


@dataclass(frozen=True)
class FinetuneOptions:
    """How long and how fast to train; the defaults fit a few minutes on two CPU cores."""

    steps: int = 300
    lr: float = 0.002  # Adam step, in units of each tensor's grid step (module doc)
    batch_size: int = 8
    held_out: int | None = None  # samples; None: an eighth of them, 8 to 64
    evaluate_every: int = 25
    patience: int = 4  # evaluations without a held-out gain, past half the steps, to stop
    # Train on ONNX Runtime's outputs of the file each step would write (gradients through the
    # torch copy); off: on the torch copy's own outputs (module doc)
    file_outputs: bool = True
    threads: int | None = None  # torch's intra-op threads; None leaves torch's default

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "evaluate_every", "patience"):
            if getattr(self, name) < 1:
                raise SchemeError(f"`{name}` must be >= 1, got {getattr(self, name)}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise SchemeError(f"`lr` must be a positive number, got {self.lr}")
        if self.held_out is not None and self.held_out < 1:
            raise SchemeError(f"`held_out` must be >= 1, got {self.held_out}")


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
    kept_ptq: bool = False  # ONNX Runtime's held-out SQNR fell: the PTQ model was written

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
            else f"kept step {self.best_step} (the best held-out loss)"
        )
        return "\n".join(
            [
                start,
                f"fine-tuned {self.steps} steps on {self.train_samples} samples in "
                f"{self.seconds:.1f} s (PTQ {self.ptq_seconds:.1f} s); losses: {losses}; {kept}",
                f"output SQNR against FP32 on {self.held_out_samples} held-out samples, "
                f"PTQ -> fine-tuned: {change}",
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
    config = config or QuantConfig()  # quantize's plan: a better start than all int8 (docs)
    options = options or FinetuneOptions()
    if config.data_free:
        raise SchemeError("finetune learns from calibration data; drop `data_free`")
    target = check_output(output_path, [model_path, calibration, start])
    model = load_model(model_path)
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
            teacher = open_session(model)
            trainer = _Trainer(quantized, teacher, samples, config, options, held_out, seed)
            best_step, steps = trainer.train(progress)
            tuned = write_back(quantized, trainer.graph, trainer.pairs)
            session = open_session(tuned, Use.CHECK)
            ptq_session = open_session(quantized, Use.CHECK)
            before = _output_sqnr(teacher, ptq_session, trainer.held, trainer.parts)
            after = _output_sqnr(teacher, session, trainer.held, trainer.parts)
            # the torch copy rounds a few ties unlike ONNX Runtime: its loss can fall while the
            # file's error rises, and the user should never get a model worse than PTQ's
            kept_ptq = min(after.values(), default=0.0) < min(before.values(), default=0.0)
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


class _Trainer:
    """The torch copy of the QDQ graph, its optimizer, and the loop over streamed batches."""

    def __init__(
        self,
        quantized: onnx.ModelProto,
        teacher: ort.InferenceSession,
        samples: Samples,
        config: QuantConfig,
        options: FinetuneOptions,
        held_out: int,
        seed: int | None,
    ) -> None:
        self.quantized = quantized
        self.graph = QdqGraph(quantized, config.weights, config.activations, config.weight_grid)
        self.pairs = avoids_saturation(config)  # as PTQ's weights: kept from saturating
        self.teacher, self.options = teacher, options
        self.rng = np.random.default_rng(seed)
        shuffled = self.rng.permutation(samples.count)
        # sorted: a compressed .npz streams forward (qdq.arrayfile)
        self.held = samples.subset(np.sort(shuffled[:held_out]))
        self.training = samples.subset(np.sort(shuffled[held_out:]))
        self.queue = np.empty(0, np.int64)  # training positions left in this pass
        self.names = [o.name for o in teacher.get_outputs()]
        feeds = self.training.span(0, PART_SAMPLES).batches(options.batch_size)
        reference = [teacher.run(self.names, feed) for feed in feeds]
        self.axes = _confirmed(_softmax_axes(quantized, self.names), reference[0])
        self.parts = output_parts(self.names, reference, config.output_parts)
        self.losses = {
            name: "kl" if axis is not None else "mse" + _labels(self.parts[name])
            for name, axis in self.axes.items()
        }
        self.optimizer = torch.optim.Adam(_param_groups(self.graph, options.lr))
        # Cosine decay to zero over the run: late steps settle instead of hopping between
        # grid points (digits CNN, 4-bit: the held-out loss rose again after step 120 without).
        self.schedule = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / options.steps))
        )

    def train(self, progress: bool) -> tuple[int, int]:
        """Train for up to `steps` steps; the model is left at the best held-out checkpoint.
        Returns that checkpoint's step and the number of steps run."""
        options = self.options
        best_loss, best_step = self._held_out_loss(), 0
        log.info("finetune step 0 (PTQ): held-out loss %.5g", best_loss)
        best_state = copy.deepcopy(self.graph.state_dict())
        waited, step = 0, 0
        bar = tqdm(total=options.steps, desc="finetune", disable=not progress, leave=False)
        with bar:
            for step in range(1, options.steps + 1):
                self._step()
                bar.update()
                if step % options.evaluate_every and step != options.steps:
                    continue
                loss = self._held_out_loss()
                bar.set_postfix(held_out=f"{loss:.4g}", best=f"{min(loss, best_loss):.4g}")
                log.info("finetune step %d: held-out loss %.5g", step, loss)
                if loss < best_loss:
                    best_loss, best_step, waited = loss, step, 0
                    best_state = copy.deepcopy(self.graph.state_dict())
                elif 2 * step >= options.steps:  # patience counts in the decay's second half
                    waited += 1
                    if waited >= options.patience:
                        break
        self.graph.load_state_dict(best_state)
        return best_step, step

    def _step(self) -> None:
        """One optimizer step on the next batch (models whose batch axis is fixed at 1
        accumulate its samples one at a time)."""
        self.optimizer.zero_grad(set_to_none=True)
        file = self._file_session() if self.options.file_outputs else None
        for feed, weight in self._feeds(self.training.subset(self._next_batch())):
            self._loss(feed, file, through=True).mul(weight).backward()
        self.optimizer.step()
        self.schedule.step()

    def _next_batch(self) -> np.ndarray:
        """The next `batch_size` training positions (sorted), every sample once a pass, each
        pass in a new random order; a batch that would straddle two passes starts the next."""
        size = min(self.options.batch_size, self.training.count)
        if len(self.queue) < size:
            self.queue = self.rng.permutation(self.training.count)
        batch, self.queue = self.queue[:size], self.queue[size:]
        return np.sort(batch)

    def _feeds(self, part: Samples) -> Iterator[tuple[dict[str, np.ndarray], float]]:
        for feed in part.batches(self.options.batch_size):
            yield feed, len(next(iter(feed.values()))) / part.count

    def _file_session(self) -> ort.InferenceSession:
        """ONNX Runtime's session of the file the current values would write."""
        return open_session(write_back(self.quantized, self.graph, self.pairs), Use.CHECK)

    def _loss(
        self,
        feed: dict[str, np.ndarray],
        session: ort.InferenceSession | None = None,
        through: bool = False,
    ) -> torch.Tensor:
        """The distillation loss of the torch copy on `feed`, or of `session`'s outputs; with
        `through`, of `session`'s output values with the torch copy's gradients (a
        straight-through estimator at the outputs)."""
        want = self.teacher.run(self.names, feed)
        if session is None or through:
            got = self.graph({k: torch.from_numpy(v) for k, v in feed.items()})
        if session is not None:
            outputs = session.run(self.names, feed)
            exact = [torch.from_numpy(np.asarray(o, np.float32)) for o in outputs]
            got = (
                [g + (e - g).detach() for g, e in zip(got, exact, strict=True)]
                if through
                else exact
            )
        total = torch.zeros(())
        by_name = dict(zip(self.names, want, strict=True))
        for name, teacher_out, student in zip(self.names, want, got, strict=True):
            target = torch.from_numpy(np.asarray(teacher_out, np.float32))
            if self.axes[name] is not None:
                total = total + _distance(student, target, self.axes[name])
                continue
            for part in self.parts[name]:
                pair = _take(student, part), _take(target, part)
                if part.gate is not None:  # a dense head's value map: where its scores fire
                    mask = torch.from_numpy(part.gate.mask(by_name))
                    pair = pair[0] * mask, pair[1] * mask
                total = total + _distance(*pair, None)
        return total

    def _held_out_loss(self) -> float:
        """The loss on the held-out samples of the file this checkpoint writes, in ONNX
        Runtime (see the module doc)."""
        session = self._file_session()
        total = 0.0
        with torch.no_grad():
            for feed, weight in self._feeds(self.held):
                total += float(self._loss(feed, session)) * weight
        return total


def _distance(student: torch.Tensor, teacher: torch.Tensor, axis: int | None) -> torch.Tensor:
    """KL(teacher || student) over a Softmax's `axis`, averaged over the other positions; or
    the squared error over the teacher's power (`axis` None)."""
    if axis is None:
        return (student - teacher).square().sum() / teacher.square().sum().clamp_min(1e-12)
    tiny = 1e-8
    kl = teacher * (torch.log(teacher + tiny) - torch.log(student.clamp_min(0) + tiny))
    return kl.sum(axis).mean()


def _take(output: torch.Tensor, part: Part) -> torch.Tensor:
    """`part`'s channels of a batch of its output."""
    if part.axis is None:
        return output
    return output.narrow(part.axis, part.start, part.stop - part.start)


def _labels(parts: list[Part]) -> str:
    """How the loss reads an output: whole, or by the parts found or declared (a declared
    part may leave channels out of the loss, as out of every score)."""
    if parts == [Part(parts[0].output)]:
        return ""
    return " per part (" + ", ".join(p.label for p in parts) + ")"


def _softmax_axes(model: onnx.ModelProto, names: list[str]) -> dict[str, int | None]:
    """Per output, the axis of the Softmax that makes it (through Q/DQ pairs), or None."""
    producer = {o: n for n in model.graph.node for o in n.output}
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 13)
    axes: dict[str, int | None] = {}
    for name in names:
        node, reshaped = producer.get(name), False
        while node is not None and node.op_type in PASS_THROUGH | RESHAPES:
            reshaped = reshaped or node.op_type in RESHAPES
            node = producer.get(node.input[0])
        axes[name] = None
        if node is not None and node.op_type == "Softmax":
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            axis = attrs.get("axis", -1 if opset >= 13 else 1)
            # after a reshape, only a last axis is known to stay last (then confirmed on data)
            axes[name] = -1 if reshaped and axis == -1 else None if reshaped else axis
    return axes


def _confirmed(axes: dict[str, int | None], outputs: list[np.ndarray]) -> dict[str, int | None]:
    """`axes` with each Softmax axis kept only where the teacher's output on a batch sums to 1
    along it (a reshape that regrouped the last axis leaves no distribution there)."""
    out = {}
    for (name, axis), value in zip(axes.items(), outputs, strict=True):
        sums = np.asarray(value, np.float64).sum(axis=axis) if axis is not None else None
        out[name] = axis if sums is not None and np.allclose(sums, 1.0, atol=1e-3) else None
    return out


def _param_groups(graph: QdqGraph, lr: float) -> list[dict]:
    """One Adam group per tensor, its rate in units of its own grid (the module doc)."""
    groups = []
    for weight, key in graph.weight_of.items():
        step = float(graph.grids[key].scale.detach().abs().mean())
        groups.append({"params": [graph.weight_param(weight)], "lr": lr * step})
    for bias in graph.bias_of:
        param = graph.weight_param(bias)
        size = float(param.detach().square().mean().sqrt())
        groups.append({"params": [param], "lr": lr * SCALE_LR_SHARE * max(size, 1e-6)})
    for grid in (g for g in graph.grids.values() if g.scale.requires_grad):
        size = float(grid.scale.detach().abs().mean())
        groups.append({"params": [grid.scale], "lr": lr * SCALE_LR_SHARE * size})
    return [g for g in groups if g["lr"] > 0]


def _output_sqnr(
    teacher: ort.InferenceSession,
    session: ort.InferenceSession,
    samples: Samples,
    parts: dict[str, list[Part]],
) -> dict[str, float]:
    """Per part of each float output, `session`'s SQNR (dB) against the teacher on
    `samples`, by the part's label (the output's name when it is one part)."""
    names = [o.name for o in teacher.get_outputs() if o.type == "tensor(float)"]
    stats = {name: [PartStats(part) for part in parts[name]] for name in names}
    for feed in samples.batches(16):
        wanted = teacher.run(names, feed)
        by_name = dict(zip(names, wanted, strict=True))
        for name, want, got in zip(names, wanted, session.run(names, feed), strict=True):
            update_all(stats[name], want, got, by_name)
    return {s.part.label: s.error.sqnr_db for group in stats.values() for s in group}
