"""Fake quantization for training: quantize and dequantize in the forward pass, pass gradients
straight through the rounding in the backward pass (STE), and learn the scales (LSQ).

`fake_quantize` is written so that autograd alone gives LSQ's gradients (Esser et al. 2020,
eq. 3): for the input, 1 inside the grid's range and 0 where it clips; for the scale,
`round(x/s) - x/s` inside and `qmin - z` or `qmax - z` outside. Rounding is half to even, as
ONNX Runtime's QuantizeLinear rounds, so a trained model and its exported QDQ file agree.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from qdq.plan.saturation import clip_pairs
from qdq.qparams import MIN_SCALE, QParams


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round half to even forward, identity backward."""
    return (torch.round(x) - x).detach() + x


def scale_grad(x: torch.Tensor, factor: float) -> torch.Tensor:
    """`x` forward, its gradient times `factor` backward (LSQ's step-size gradient scale)."""
    return (x - x * factor).detach() + x * factor


def _along(t: torch.Tensor, axis: int | None, ndim: int) -> torch.Tensor:
    """A per-channel parameter shaped to broadcast along `axis` of an `ndim`-d tensor."""
    if axis is None or t.ndim == 0:
        return t
    shape = [1] * ndim
    shape[axis % ndim] = -1
    return t.reshape(shape)


def fake_quantize(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    qmin: int,
    qmax: int,
    axis: int | None = None,
    grad_factor: float = 1.0,
    clip: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """`(clamp(round(x / s) + z, qmin, qmax) - z) * s`, differentiable in `x` and `s` (STE and
    LSQ); `scale` and `zero_point` are scalars or one per slice along `axis`. `clip` changes
    some codes after the clamp, its change passed straight through as the rounding's is."""
    s = _along(scale_grad(scale, grad_factor), axis, x.ndim).clamp_min(MIN_SCALE)
    z = _along(zero_point, axis, x.ndim)
    q = torch.clamp(round_ste(x / s) + z, qmin, qmax)
    if clip is not None:
        q = q + (clip(q.detach()) - q.detach())
    return (q - z) * s


def lsq_factor(x: torch.Tensor, scales: int, qmax: int) -> float:
    """LSQ's gradient scale `1 / sqrt(N * Q_P)`: N the elements each scale covers (per sample
    for activations, whose first axis is the batch)."""
    return 1.0 / math.sqrt(max(x.numel() // max(scales, 1), 1) * max(qmax, 1))


class FakeQuantize(nn.Module):
    """One tensor's grid as a module: scale learnable (LSQ) unless `learn_scale` is off; zero
    point fixed. Built from qdq's `QParams`, read back with `qparams()`."""

    def __init__(
        self,
        scale: np.ndarray | torch.Tensor,
        zero_point: np.ndarray | torch.Tensor,
        qmin: int,
        qmax: int,
        axis: int | None = None,
        learn_scale: bool = True,
        per_sample: bool = False,
    ) -> None:
        super().__init__()
        scale = torch.as_tensor(np.asarray(scale, np.float32))
        self.scale = nn.Parameter(scale, requires_grad=learn_scale)
        self.register_buffer("zero_point", torch.as_tensor(np.asarray(zero_point, np.float32)))
        self.qmin, self.qmax, self.axis = qmin, qmax, axis
        self.per_sample = per_sample  # activations: N in LSQ's factor counts one sample
        self.max_scale: float | None = None  # a bound the learned scale may not pass
        # a weight's summation order (`qdq.plan.saturation.clip_pairs`): codes kept pair-safe
        self.pairs: np.ndarray | None = None

    @classmethod
    def from_qparams(
        cls, qparams: QParams, axis: int | None = None, learn_scale: bool = True, **kw
    ) -> FakeQuantize:
        s = qparams.scheme
        return cls(qparams.scale, qparams.zero_point, s.qmin, s.qmax, axis, learn_scale, **kw)

    def bounded_scale(self) -> torch.Tensor:
        """The scale in use: the learned one, held under `max_scale` when that is set."""
        return self.scale if self.max_scale is None else self.scale.clamp_max(self.max_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        covered = x[0] if self.per_sample and x.ndim > 0 else x
        factor = lsq_factor(covered, self.scale.numel(), self.qmax)
        clip = self._clip_pairs if self.pairs is not None else None
        return fake_quantize(
            x, self.bounded_scale(), self.zero_point, self.qmin, self.qmax, self.axis, factor, clip
        )

    def codes(self, x: torch.Tensor) -> torch.Tensor:
        """The integer codes `x` takes on this grid (no gradient)."""
        with torch.no_grad():
            s = _along(self.bounded_scale(), self.axis, x.ndim).clamp_min(MIN_SCALE)
            z = _along(self.zero_point, self.axis, x.ndim)
            codes = torch.clamp(torch.round(x / s) + z, self.qmin, self.qmax)
            return codes if self.pairs is None else self._clip_pairs(codes)

    def dequantize(self, codes: torch.Tensor) -> torch.Tensor:
        """The values `codes` stand for on this grid (no gradient)."""
        with torch.no_grad():
            s = _along(self.bounded_scale(), self.axis, codes.ndim).clamp_min(MIN_SCALE)
            return (codes - _along(self.zero_point, self.axis, codes.ndim)) * s

    def _clip_pairs(self, codes: torch.Tensor) -> torch.Tensor:
        """`codes` (zero point 0) with each pair of neighbours past 128 of one sign clipped."""
        clipped = clip_pairs(codes.cpu().numpy(), self.pairs)
        return torch.from_numpy(clipped).to(codes)

    def extra_repr(self) -> str:
        return f"codes=[{self.qmin}, {self.qmax}], axis={self.axis}"


class _Exp(nn.Module):
    """`scale = exp(p)`, initialized by `p = log(scale)`."""

    def forward(self, p: torch.Tensor) -> torch.Tensor:
        return torch.exp(p)

    def right_inverse(self, scale: torch.Tensor) -> torch.Tensor:
        return torch.log(scale.clamp_min(MIN_SCALE))


def learn_log_scale(quantizer: FakeQuantize) -> FakeQuantize:
    """`quantizer` with its learned scale held as log(scale) (a torch parametrization;
    `quantizer.scale` still reads the scale). Adam moves a parameter by about its learning rate
    per step whatever the parameter's size, so a scale of 0.004 (an input in [0, 1]) held as is
    crosses 0 within a few steps at lr 1e-3, where clamping kills its gradient and the layer;
    held as a log, each step changes it by a ratio and it stays positive."""
    from torch.nn.utils import parametrize

    if quantizer.scale.requires_grad:
        parametrize.register_parametrization(quantizer, "scale", _Exp())
    return quantizer
