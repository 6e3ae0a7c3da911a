"""The training loop of `qdq finetune` (qdq.qat.finetune): the torch copy's optimizer and
rates, the streamed batches and the held-out checkpoints; its options are
qdq.qat.finetune_options', the loss it minimizes qdq.qat.finetune_loss's.

A random eighth of the samples (8 to 64) is held out: the loss on them (or, with
`checkpoint_by` "agreement", the share ranked as FP32: `HeldOut`), measured every
`evaluate_every` steps from step 0 (the PTQ model itself), picks the checkpoint written and
stops training after `patience` evaluations without a gain in the second half of the run (the
loss often stalls while the cosine-decayed rate is high, then falls: docs/finetune.md). Each
evaluation's log line gives the mean training loss of the steps since the last one beside it:
near the held-out loss, the fit is the limit and more samples would not help (EfficientNet-Lite0
and PP-OCRv4's recognizer agree with FP32 as often on the samples they trained on as on new
ones: docs/finetune.md, stop 55); far below it, the training samples are being learnt. It is
measured in ONNX Runtime on the file each checkpoint would write, not on the torch copy: the
two round a few ties apart, and on a model that amplifies noise (PP-OCRv4's recognizer: ONNX
Runtime's fused and unfused runs of one QDQ file differ by 23 dB) the torch loss fell by half
while the file's error barely moved (docs/finetune.md). Each training step runs that file
too (`FinetuneOptions.file_outputs`): its loss is the file's outputs', and the torch copy's
forward pass carries the file's codes at every quantized activation (`expose_codes`), so the
gradient is taken where ONNX Runtime's values are, however the float ops between round (the
recognizer's float depthwise convolutions: 24.9 dB apart without, 138.8 dB with). Each batch is
the next `batch_size` of the training samples in an order shuffled every pass (a folder of
images sorted by class would otherwise give batches of one class, and a held-out set of the
last), read from the samples as training draws them, so memory does not grow with their
number.

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
import functools
import logging
import math
from collections.abc import Iterator

import numpy as np
import onnx
import onnxruntime as ort
import torch
from tqdm import tqdm

from qdq.config import QuantConfig
from qdq.data import Samples
from qdq.errors import DataError
from qdq.onnx.sessions import Use, open_session
from qdq.plan.parts import output_parts
from qdq.plan.saturation import avoids_saturation
from qdq.qat.convert import QdqGraph
from qdq.qat.filecodes import FileRun, dequantized, expose_codes
from qdq.qat.finetune_loss import (
    confirmed_axes,
    distance,
    flip_margin,
    log_scores,
    loss_labels,
    softmax_axes,
    take_part,
)
from qdq.qat.finetune_options import FinetuneOptions
from qdq.qat.held_out import HeldOut
from qdq.qat.oscillation import OscillationFreezer
from qdq.qat.write import write_back

# `qdq finetune`'s logger, named after its entry: users and bench/qat_finetune.py enable that name
log = logging.getLogger("qdq.qat.finetune")
SCALE_LR_SHARE = 0.1  # scales and biases move at this share of `lr` (see the module doc)
PART_SAMPLES = 16  # training samples whose teacher outputs find each output's parts


class Trainer:
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
        # the float outputs: a mask or ids is no distance to learn from
        outputs = {o.name for o in quantized.graph.output}
        served = teacher.get_outputs()
        self.names = [o.name for o in served if o.name in outputs and o.type == "tensor(float)"]
        # inner tensors the teacher serves too (`feature_tensors`), for `feature_weight`
        self.features = [o.name for o in served if o.name not in outputs]
        if options.feature_weight and not self.features:
            raise DataError(
                "`feature_weight` distils the inner tensors the plan quantizes, and this model "
                "has none (only its inputs and outputs are quantized), or FP32's session serves "
                "none of them (`feature_tensors` names them); drop `feature_weight`"
            )
        feeds = self.training.span(0, PART_SAMPLES).batches(options.batch_size)
        reference = [teacher.run(self.names, feed) for feed in feeds]
        broken = next((n for batch in reference for n, o in zip(self.names, batch, strict=True)
                       if not np.isfinite(o).all()), None)  # fmt: skip
        if broken is not None:
            raise DataError(
                f"FP32's output {broken!r} holds NaN or Inf on the training samples: there is "
                "nothing to distil it toward; fix the model or its samples, or quantize it alone"
            )
        self.axes = confirmed_axes(softmax_axes(quantized, self.names), reference[0])
        self.parts = output_parts(self.names, reference, config.output_parts)
        # a Softmax output declared too already has the term, on its log-probabilities
        self.logits = {n for n in options.class_logits if self.axes.get(n, 0) is None}
        shapes = {n: np.shape(o) for n, o in zip(self.names, reference[0], strict=True)}
        classless = sorted(n for n in self.logits if len(shapes[n]) < 2 or shapes[n][-1] < 2)
        if classless:
            seen = [list(shapes[n]) for n in classless]
            raise DataError(
                f"`class_logits` names {classless}, of shapes {seen}: class logits lie along an "
                "output's last axis after its batch axis, at least 2 of them; leave these out"
            )
        # the class axis of each output of class scores: Softmax outputs and declared logits
        self.classes = {n: a for n, a in self.axes.items() if a is not None}
        self.classes |= dict.fromkeys(self.logits, -1)
        self.losses = {
            name: ("kl" if axis is not None else "mse" + loss_labels(self.parts[name]))
            + (" + margin" if options.margin_weight and name in self.classes else "")
            for name, axis in self.axes.items()
        }
        if options.feature_weight:
            label = f"{len(self.features)} inner tensors"
            self.losses[label] = f"mse x {options.feature_weight:g} (training steps)"
        groups = _param_groups(self.graph, options.lr)
        if not groups:
            raise DataError(
                "the quantized model has no weights or scales to learn (no int8 layer); "
                "fine-tuning has nothing to change, so keep `qdq quantize`'s file"
            )
        self.optimizer = torch.optim.Adam(groups)
        self.scores = (HeldOut(math.nan, None, held_out),) * 2  # `train`'s start and best
        threshold = options.freeze_oscillations
        self.freezer = None if threshold is None else OscillationFreezer(self.graph, threshold)
        # Cosine decay to zero over the run: late steps settle instead of hopping between
        # grid points (digits CNN, 4-bit: the held-out loss rose again after step 120 without).
        self.schedule = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / options.steps))
        )

    def train(self, progress: bool) -> tuple[int, int]:
        """Train for up to `steps` steps; the model is left at the best held-out checkpoint.
        Returns that checkpoint's step and the number of steps run; `scores` holds the PTQ
        start's held-out score and the checkpoint's."""
        options = self.options
        best, best_step = self._held_out(), 0
        start = best
        log.info("finetune step 0 (PTQ): %s", best)
        best_state = copy.deepcopy(self.graph.state_dict())
        waited, step = 0, 0
        since: list[float] = []  # the training loss of each step since the last evaluation
        bar = tqdm(total=options.steps, desc="finetune", disable=not progress, leave=False)
        with bar:
            for step in range(1, options.steps + 1):
                since.append(self._step())
                bar.update()
                if step % options.evaluate_every and step != options.steps:
                    continue
                score = self._held_out()
                frozen = "" if self.freezer is None else f", {self.freezer.frozen()} weights frozen"
                trained, since = sum(since) / len(since), []
                log.info("finetune step %d: %s, training loss %.5g%s", step, score, trained, frozen)
                if score.beats(best, options.checkpoint_by):
                    best, best_step, waited = score, step, 0
                    best_state = copy.deepcopy(self.graph.state_dict())
                elif 2 * step >= options.steps:  # patience counts in the decay's second half
                    waited += 1
                    if waited >= options.patience:
                        break
                bar.set_postfix(
                    held_out=f"{score.loss:.4g}", best=f"{best.loss:.4g}", training=f"{trained:.4g}"
                )
        self.graph.load_state_dict(best_state)
        self.scores = start, best
        return best_step, step

    def _step(self) -> float:
        """One optimizer step on the next batch (models whose batch axis is fixed at 1
        accumulate its samples one at a time); returns the batch's loss before the step."""
        self.optimizer.zero_grad(set_to_none=True)
        file = self._file_session() if self.options.file_outputs else None
        total = 0.0
        for feed, weight in self._feeds(self.training.subset(self._next_batch())):
            loss = self._loss(feed, file, through=True).mul(weight)
            loss.backward()
            total += float(loss.detach())
        self.optimizer.step()
        self.schedule.step()
        if self.freezer is not None:
            self.freezer.update()
        return total

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
            yield feed, part.held_in(feed) / part.count

    def _file_session(self) -> FileRun:
        """ONNX Runtime's session of the file the current values would write, which also
        gives the codes of its activations."""
        model = write_back(self.quantized, self.graph, self.pairs)
        grids = expose_codes(model)
        return FileRun(open_session(model, Use.CHECK), grids)

    def _loss(
        self,
        feed: dict[str, np.ndarray],
        run: FileRun | None = None,
        through: bool = False,
    ) -> torch.Tensor:
        """The distillation loss of the torch copy on `feed`, or of `run`'s outputs; with
        `through`, of `run`'s values (outputs and every activation's codes) with the torch
        copy's gradients (a straight-through estimator at each quantized activation), plus
        `feature_weight` times the inner tensors' mean error (a training step's loss)."""
        inner = self.features if through and self.options.feature_weight else []
        want, got = self._outputs(feed, run, through, inner)
        count = len(self.names)
        loss = self._distance(want[:count], got[:count])
        if inner:
            pairs = zip(got[count:], want[count:], strict=True)
            terms = [
                distance(s, torch.from_numpy(np.asarray(t, np.float32)), None) for s, t in pairs
            ]
            loss = loss + self.options.feature_weight * torch.stack(terms).mean()
        return loss

    def _outputs(
        self, feed: dict[str, np.ndarray], run: FileRun | None, through: bool, inner: list[str]
    ) -> tuple[list[np.ndarray], list[torch.Tensor]]:
        """The teacher's values of the outputs and then the `inner` tensors on `feed`, and
        the student's, as `_loss` takes them (`inner` only from the torch copy)."""
        want = self.teacher.run(self.names + inner, feed)
        if run is not None and not through:
            got = [
                torch.from_numpy(np.asarray(o, np.float32))
                for o in run.session.run(self.names, feed)
            ]
        else:
            known, exact = None, None
            if run is not None:
                values = run.session.run(self.names + list(run.grids), feed)
                exact = values[: len(self.names)]
                codes = zip(run.grids.items(), values[len(self.names) :], strict=True)
                known = {name: dequantized(value, *grid) for (name, grid), value in codes}
            feeds = {k: torch.from_numpy(v) for k, v in feed.items()}
            outputs = self.graph(feeds, known, inner)
            by_output = dict(zip(self.graph.outputs + inner, outputs, strict=True))
            got = [by_output[name] for name in self.names + inner]
            if exact is not None:
                got[: len(exact)] = [
                    g + (torch.from_numpy(np.asarray(e, np.float32)) - g).detach()
                    for g, e in zip(got[: len(exact)], exact, strict=True)
                ]
        return want, got

    def _distance(self, want: list[np.ndarray], got: list[torch.Tensor]) -> torch.Tensor:
        """The distillation loss of the student's outputs `got` against the teacher's."""
        total = torch.zeros(())
        by_name = dict(zip(self.names, want, strict=True))
        for name, teacher_out, student in zip(self.names, want, got, strict=True):
            target = torch.from_numpy(np.asarray(teacher_out, np.float32))
            if self.options.margin_weight and name in self.logits:
                margin = flip_margin(student, target, -1)
                total = total + self.options.margin_weight * margin
            if self.axes[name] is not None:
                total = total + distance(student, target, self.axes[name])
                if self.options.margin_weight:
                    pair = log_scores(student), log_scores(target)
                    total = total + self.options.margin_weight * flip_margin(*pair, self.axes[name])
                continue
            for part in self.parts[name]:
                pair = take_part(student, part), take_part(target, part)
                if part.gate is not None:  # a dense head's value map: where its scores fire
                    mask = torch.from_numpy(part.gate.mask(by_name))
                    pair = pair[0] * mask, pair[1] * mask
                total = total + distance(*pair, None)
        return total

    def _held_out(self) -> HeldOut:
        """The loss and agreement on the held-out samples of the file this checkpoint
        writes, in ONNX Runtime (see the module doc)."""
        run = self._file_session()
        total, agreed = 0.0, 0
        with torch.no_grad():
            for feed, weight in self._feeds(self.held):
                want, got = self._outputs(feed, run, False, [])
                total += float(self._distance(want, got)) * weight
                agreed += self._agreeing(want, got, self.held.held_in(feed))
        return HeldOut(total, agreed / self.held.count if self.classes else None, self.held.count)

    def _agreeing(self, want: list[np.ndarray], got: list[torch.Tensor], count: int) -> int:
        """How many of a batch's `count` samples the student ranks as the teacher does at
        every position of every class output."""
        same = np.ones(count, bool)
        for name, teacher_out, student in zip(self.names, want, got, strict=True):
            if name in self.classes:
                axis = self.classes[name]
                match = np.argmax(teacher_out, axis) == student.numpy().argmax(axis)
                same &= _per_sample(match, count, self._batch_axes.get(name))
        return int(same.sum())

    @functools.cached_property
    def _batch_axes(self) -> dict[str, int | None]:
        """Each output's batch axis: the one whose size follows the samples, the teacher run
        on one held-out sample and on two (a time-major recognizer's of as many steps as a
        batch has samples had been taken for its time axis); none where the samples do not
        batch."""
        one, two = (next(self.held.batches(n), None) for n in (1, 2))
        if one is None or two is None or self.held.held_in(two) != 2:
            return {}
        shapes = zip(
            self.teacher.run(self.names, one), self.teacher.run(self.names, two), strict=True
        )
        axes = {}
        for name, (a, b) in zip(self.names, shapes, strict=True):
            moved = [i for i, (m, n) in enumerate(zip(a.shape, b.shape, strict=False)) if m != n]
            axes[name] = moved[0] if len(moved) == 1 and a.ndim == b.ndim else None
        return axes


def _per_sample(match: np.ndarray, count: int, axis: int | None = None) -> np.ndarray:
    """Whether each of a batch's `count` samples matches at all its positions, the batch
    along `axis` (the output's `_batch_axes`; without it, the first of `count` entries, which a
    time-major recognizer's is not); an output without one (a batch-1 model's) is one sample."""
    if axis is None or match.shape[axis] != count:
        axis = next((i for i, size in enumerate(match.shape) if size == count), None)
    if axis is None:
        return np.full(count, bool(match.all()))
    return np.moveaxis(match, axis, 0).reshape(count, -1).all(1)


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
