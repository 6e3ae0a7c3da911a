"""A `qdq finetune` checkpoint's score on the held-out samples, and the rule that ranks two
(`FinetuneOptions.checkpoint_by`): the trainer keeps the best, and `finetune_model` compares
the one kept with PTQ's file."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class HeldOut:
    """A checkpoint's score on the held-out samples, in ONNX Runtime: the loss, and the share
    of samples ranked as FP32 ranks them at every position of every class output (Softmax
    outputs and `class_logits`: top-1 agreement for a classifier, every step's top class for
    a sequence recognizer); None without a class output."""

    loss: float
    agreement: float | None
    samples: int  # held out: the share's denominator

    def beats(self, other: HeldOut, by: str) -> bool:
        """Whether this checkpoint is better than `other`: by the loss, or by `agreement` where
        the two shares differ by more than their sampling noise (of shares within it, the lower
        loss; the loss alone without a class output).

        The band is one standard error of a share of `samples`: on one draw, EfficientNet-Lite0's
        share of 256 held-out crops moved by up to 5 points between checkpoints 25 steps apart,
        the same files by up to 1.4 on 1024 other crops, and its highest share was step 25's,
        which agreed on 95.1% of those crops against the loss's pick's 96.6% (docs/finetune.md,
        stop 54)."""
        ranked = by == "agreement" and None not in (self.agreement, other.agreement)
        if ranked and abs(self.agreement - other.agreement) > self._noise(other):
            return self.agreement > other.agreement
        return self.loss < other.loss

    def _noise(self, other: HeldOut) -> float:
        """One standard error of the two shares' mean (at least one sample's worth)."""
        share = (self.agreement + other.agreement) / 2
        return math.sqrt(max(share * (1 - share), 1 / self.samples) / self.samples)

    def __str__(self) -> str:
        agreement = "" if self.agreement is None else f", ranked as FP32 {self.agreement:.2%}"
        return f"held-out loss {self.loss:.5g}{agreement}"
