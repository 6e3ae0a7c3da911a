"""How long and how fast `qdq finetune` trains, and on what loss terms: `FinetuneOptions`,
checked on creation (the loop that reads them: qdq.qat.finetune_trainer)."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import numpy as np

from qdq.config import CHECKPOINT_BY
from qdq.errors import SchemeError, expect

MAX_LR = 256  # grid steps per step: the whole int8 grid


@dataclass(frozen=True)
class FinetuneOptions:
    """How long and how fast to train; the defaults fit a few minutes on two CPU cores."""

    steps: int = 300
    lr: float = 0.002  # Adam step, in units of each tensor's grid step (module doc)
    batch_size: int = 8
    held_out: int | None = None  # samples; None: an eighth of them, 8 to 64
    evaluate_every: int = 25
    patience: int = 4  # evaluations without a held-out gain, past half the steps, to stop
    # Train on ONNX Runtime's outputs and activation codes of the file each step would write
    # (gradients through the torch copy); off: on the torch copy's own values (module doc)
    file_outputs: bool = True
    threads: int | None = None  # torch's intra-op threads; None leaves torch's default
    # Freeze a weight whose code flips back more often than this share of steps
    # (qdq.qat.oscillation); None: never
    freeze_oscillations: float | None = None
    margin_weight: float = 0.0  # weight of `flip_margin` (Softmax outputs, class_logits)
    # Weight of the inner tensors' error beside the outputs' in training steps (held-out
    # checkpoints stay by the outputs): each quantized activation's float input against
    # FP32's same tensor (`feature_tensors`); 0: off
    feature_weight: float = 0.0
    # Outputs that hold class logits along their last axis: `flip_margin` (margin_weight)
    # applies to them too, beside their squared error (no Softmax tells of them in the graph)
    class_logits: tuple[str, ...] = ()
    # What picks the checkpoint on the held-out samples: "loss", or "agreement" (`HeldOut`)
    checkpoint_by: str = "loss"

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "evaluate_every", "patience"):
            expect(getattr(self, name), numbers.Integral, f"`{name}`")
        for name in ("held_out", "threads"):
            expect(getattr(self, name), (numbers.Integral, type(None)), f"`{name}`")
        expect(self.lr, numbers.Real, "`lr`")
        expect(self.freeze_oscillations, (numbers.Real, type(None)), "`freeze_oscillations`")
        expect(self.margin_weight, numbers.Real, "`margin_weight`")
        expect(self.feature_weight, numbers.Real, "`feature_weight`")
        expect(self.file_outputs, (bool, np.bool_), "`file_outputs`")
        expect(self.class_logits, tuple, "`class_logits`")
        expect(self.checkpoint_by, str, "`checkpoint_by`")
        for name in self.class_logits:
            expect(name, str, "each of `class_logits`")
        if self.threads is not None and self.threads < 1:
            raise SchemeError(f"`threads` must be >= 1, got {self.threads}")
        for name in ("steps", "batch_size", "evaluate_every", "patience"):
            if getattr(self, name) < 1:
                raise SchemeError(f"`{name}` must be >= 1, got {getattr(self, name)}")
        if not (math.isfinite(self.lr) and 0 < self.lr <= MAX_LR):
            raise SchemeError(
                f"`lr` must be in (0, {MAX_LR}] grid steps per step (past that every step "
                f"crosses the whole int8 grid), got {self.lr}; 0.002 is typical"
            )
        if self.freeze_oscillations is not None and not 0 < self.freeze_oscillations < 1:
            raise SchemeError(
                f"`freeze_oscillations` must be in (0, 1), got {self.freeze_oscillations}"
            )
        if self.held_out is not None and self.held_out < 1:
            raise SchemeError(f"`held_out` must be >= 1, got {self.held_out}")
        if not (math.isfinite(self.margin_weight) and self.margin_weight >= 0):
            raise SchemeError(f"`margin_weight` must be >= 0 (0: off), got {self.margin_weight}")
        if not (math.isfinite(self.feature_weight) and self.feature_weight >= 0):
            raise SchemeError(f"`feature_weight` must be >= 0 (0: off), got {self.feature_weight}")
        if self.checkpoint_by not in CHECKPOINT_BY:
            raise SchemeError(
                f"`checkpoint_by` must be one of {', '.join(CHECKPOINT_BY)}, "
                f"got {self.checkpoint_by!r}"
            )
        if self.class_logits and not self.margin_weight and self.checkpoint_by == "loss":
            raise SchemeError(
                "`class_logits` names outputs for the margin term, which `margin_weight` 0 "
                "turns off, and for `checkpoint_by` 'agreement'; give either too"
            )
