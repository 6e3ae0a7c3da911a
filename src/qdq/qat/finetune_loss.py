"""The distillation loss of `qdq finetune`: how each output of the int8 student is measured
against the FP32 teacher's, apart from the loop that minimizes it (qdq.qat.finetune_trainer):

- an output a Softmax makes is a distribution: KL(teacher || student) over the Softmax axis
  (also behind a reshape that keeps a last Softmax axis last, checked on the teacher's outputs),
  and, weighted by `FinetuneOptions.margin_weight`, `flip_margin`: a hinge on the ranking that
  KL barely sees at a near-tie (docs/finetune.md, stop 51); also on the outputs the user
  declares class logits (`FinetuneOptions.class_logits`), beside their squared error;
- any other output (logits, regression maps, boxes, embeddings): the squared error over the
  teacher's power, sum (s - t)^2 / sum t^2, which is 10^(-SQNR/10): minimizing it maximizes
  that output's SQNR. MSE on logits distils at least as well as KL on them (Kim et al. 2021).
  An output that joins different quantities (a YOLO head's [boxes | class scores]: the parts
  `qdq.plan.parts` finds, or `QuantConfig.output_parts` declares) gets that error per part,
  summed, so that scores in [0, 1] weigh as much as boxes in pixels (as one tensor, the boxes'
  error is all the loss sees; issue 15's lesson for PTQ). A dense head's value map (a part
  with a `Gate`: CenterFace's offsets) counts only where the teacher's score map fires: the
  trainer zeroes both sides elsewhere.

With `FinetuneOptions.feature_weight`, a training step adds that weight times the mean squared
error over the teacher's power of the inner tensors `feature_tensors` names: each quantized
activation's float input, against FP32's same tensor, so every layer is told where its error
starts instead of only what reaches the outputs (EfficientNet-Lite0: docs/finetune.md, stop 63).
"""

from __future__ import annotations

import numpy as np
import onnx
import torch

from qdq.plan.parts import Part

MARGIN = 0.5  # nats: the most `flip_margin` asks of the student's margin
PASS_THROUGH = {"QuantizeLinear", "DequantizeLinear", "Identity"}
# Ops that regroup the other axes and may keep a Softmax's last axis last (PP-OCRv4's
# recognizer reshapes its (N * T, classes) Softmax to (N, T, classes)); the teacher's outputs
# confirm it (`confirmed_axes`).
RESHAPES = {"Reshape", "Flatten", "Squeeze", "Unsqueeze"}


def distance(student: torch.Tensor, teacher: torch.Tensor, axis: int | None) -> torch.Tensor:
    """KL(teacher || student) over a Softmax's `axis`, averaged over the other positions; or
    the squared error over the teacher's power (`axis` None)."""
    if axis is None:
        return (student - teacher).square().sum() / teacher.square().sum().clamp_min(1e-12)
    tiny = 1e-8
    kl = teacher * (torch.log(teacher + tiny) - torch.log(student.clamp_min(0) + tiny))
    return kl.sum(axis).mean()


def log_scores(probabilities: torch.Tensor) -> torch.Tensor:
    """A Softmax output's log-probabilities, which rank as its logits and share their margins."""
    return torch.log(probabilities.clamp_min(0) + 1e-8)


def flip_margin(student: torch.Tensor, teacher: torch.Tensor, axis: int) -> torch.Tensor:
    """How far the student's margin for the teacher's top class (over the runner-up) falls
    short of half the teacher's own margin, capped at MARGIN nats; averaged over the positions.
    Zero wherever the student ranks as the teacher does with room. Both sides are log-scores:
    logits or log-probabilities (`log_scores`), whose margins are the same."""
    if student.shape[axis] < 2:  # one class: no ranking (and no runner-up to subtract)
        return student.new_zeros(())
    top = teacher.argmax(axis, keepdim=True)
    mask = torch.zeros_like(teacher, dtype=torch.bool).scatter_(axis, top, True)
    s_margin, t_margin = (
        x.gather(axis, top) - x.masked_fill(mask, -torch.inf).amax(axis, keepdim=True)
        for x in (student, teacher)
    )
    return torch.relu((t_margin / 2).clamp(max=MARGIN) - s_margin).mean()


def take_part(output: torch.Tensor, part: Part) -> torch.Tensor:
    """`part`'s channels of a batch of its output."""
    if part.axis is None:
        return output
    return output.narrow(part.axis, part.start, part.stop - part.start)


def loss_labels(parts: list[Part]) -> str:
    """How the loss reads an output: whole, or by the parts found or declared (a declared
    part may leave channels out of the loss, as out of every score)."""
    if parts == [Part(parts[0].output)]:
        return ""
    return " per part (" + ", ".join(p.label for p in parts) + ")"


def softmax_axes(model: onnx.ModelProto, names: list[str]) -> dict[str, int | None]:
    """Per output, the axis of the Softmax that makes it (through Q/DQ pairs), or None."""
    producer = {o: n for n in model.graph.node for o in n.output}
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 13)
    graph = model.graph
    ranks = {  # a positive axis is the last one where the Softmax's input rank says so
        v.name: len(v.type.tensor_type.shape.dim)
        for v in (*graph.input, *graph.value_info, *graph.output)
        if v.type.tensor_type.HasField("shape")
    }
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
            axis = -1 if axis >= 0 and axis == ranks.get(node.input[0], 0) - 1 else axis
            # after a reshape, only a last axis is known to stay last (then confirmed on data)
            axes[name] = -1 if reshaped and axis == -1 else None if reshaped else axis
    return axes


def confirmed_axes(axes: dict[str, int | None], outputs: list[np.ndarray]) -> dict[str, int | None]:
    """`axes` with each Softmax axis kept only where the teacher's output on a batch sums to 1
    along it (a reshape that regrouped the last axis leaves no distribution there)."""
    out = {}
    for (name, axis), value in zip(axes.items(), outputs, strict=True):
        sums = np.asarray(value, np.float64).sum(axis=axis) if axis is not None else None
        out[name] = axis if sums is not None and np.allclose(sums, 1.0, atol=1e-3) else None
    return out


def feature_tensors(model: onnx.ModelProto, quantized: onnx.ModelProto) -> list[str]:
    """The float tensors each activation QuantizeLinear of `quantized` reads that the FP32
    `model`'s nodes make too (under the same name), in graph order, without its outputs."""
    made = {o for node in model.graph.node for o in node.output}
    made -= {o.name for o in model.graph.output}
    reads = (n.input[0] for n in quantized.graph.node if n.op_type == "QuantizeLinear")
    return list(dict.fromkeys(name for name in reads if name in made))
