"""Freezing weights that oscillate between two codes while fine-tuning (Nagel et al. 2022,
"Overcoming Oscillations in Quantization-Aware Training", iterative freezing).

With the straight-through estimator a weight near a rounding boundary is pushed across it,
then back, step after step: its code flips while its float copy barely moves, and each flip
changes the network a little. Per weight, an oscillation is a code change in the opposite
direction of its last change; its frequency is a running average over steps, and a weight
whose frequency passes `threshold` is frozen at the code it held most (the running average of
its codes, rounded) for the rest of the run. On PP-OCRv4's recognizer (threshold 0.02, 0.5-0.7%
of its weights frozen) the fine-tuned files gained 0.5-1.0 dB of output SQNR on three draws
(docs/finetune.md, stop 43), EfficientNet-Lite0's none; the recognizer's held-out loss
jumped between checks all the same.
"""

from __future__ import annotations

import torch

from qdq.qat.convert import QdqGraph

MOMENTUM = 0.99  # the running averages' memory: about the last 100 steps


class OscillationFreezer:
    """Tracks every uniform-grid weight's codes step by step and freezes the oscillating ones."""

    def __init__(self, graph: QdqGraph, threshold: float) -> None:
        self.graph, self.threshold = graph, threshold
        self.state: dict[str, dict[str, torch.Tensor]] = {}
        for weight, key in graph.weight_of.items():
            if graph.lowbit_weight(weight) is not None:
                continue  # a low-bit grid's codes follow the weight's statistics, not rounding
            codes = graph.grids[key].codes(graph.weight_param(weight).detach())
            self.state[weight] = {
                "codes": codes,
                "direction": torch.zeros_like(codes),
                "frequency": torch.zeros_like(codes),
                "average": codes.clone(),
                "frozen": torch.zeros_like(codes, dtype=torch.bool),
                "held": codes.clone(),
            }

    def update(self) -> None:
        """After an optimizer step: count each weight's oscillation, freeze those past the
        threshold, and put every frozen weight back on its held code (at the current scale)."""
        for weight, s in self.state.items():
            param = self.graph.weight_param(weight)
            grid = self.graph.grids[self.graph.weight_of[weight]]
            codes = grid.codes(param.detach())
            change = torch.sign(codes - s["codes"])
            flipped = (change != 0) & (change == -s["direction"])
            s["frequency"].mul_(MOMENTUM).add_(flipped.float(), alpha=1 - MOMENTUM)
            s["average"].mul_(MOMENTUM).add_(codes, alpha=1 - MOMENTUM)
            s["direction"] = torch.where(change != 0, change, s["direction"])
            newly = (s["frequency"] > self.threshold) & ~s["frozen"]
            s["held"] = torch.where(newly, torch.round(s["average"]), s["held"])
            s["frozen"] |= newly
            s["codes"] = torch.where(s["frozen"], s["held"], codes)
            if s["frozen"].any():
                with torch.no_grad():
                    value = grid.dequantize(s["held"])
                    param.copy_(torch.where(s["frozen"], value, param))

    def frozen(self) -> int:
        """How many weights are frozen."""
        return int(sum(int(s["frozen"].sum()) for s in self.state.values()))
