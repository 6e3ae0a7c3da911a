"""qdq's low-bit weight grids in training: binary, ternary and power-of-two codes times one
scale per channel, the same numbers as `qdq.lowbit` (docs/quantization.md, §16-§18), with
straight-through gradients.

The forward pass computes codes and scales in float64 exactly as the NumPy reference does, so
`LowBitWeight(grid, scheme)(w)` equals `codes * scale` of `qdq.lowbit.grid_codes(w, grid,
scheme)` bit for bit and the exported file holds the codes training saw. The backward pass is
the identity (BinaryConnect's and TWN's straight-through estimator): the grid's scale follows
the weights (mean|w| or the best power-of-two fit), so nothing else is learned.
"""

from __future__ import annotations

import torch
from torch import nn

from qdq.lowbit import OCTAVES, STEPS_PER_OCTAVE, TWN_THRESHOLD, WeightGrid, check_grid, top_code
from qdq.qparams import MIN_SCALE
from qdq.scheme import PerChannel, QScheme


def binarize(rows: torch.Tensor, power_of_two_scale: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """XNOR-Net per row of float64 `rows` (C, K): codes sign(w) with sign(0) = +1, scale
    mean|w| (eq. 25). Row [0.5, -1.5, 0.25, -1.75] -> codes [1, -1, 1, -1], scale 1.0."""
    codes = torch.where(rows >= 0, 1.0, -1.0).to(rows.dtype)
    return codes, _scale(rows.abs().mean(dim=1), power_of_two_scale)


def ternarize(rows: torch.Tensor, power_of_two_scale: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """TWN per row: codes sign(w) where |w| > 0.7 mean|w| (eq. 26), else 0; scale the mean
    |w| of those kept (eq. 27). Row [1.0, -0.2, 0.1, -0.7] -> codes [1, 0, 0, -1], scale 0.85."""
    magnitude = rows.abs()
    kept = magnitude > TWN_THRESHOLD * magnitude.mean(dim=1, keepdim=True)
    codes = torch.where(kept, torch.where(rows >= 0, 1.0, -1.0), 0.0).to(rows.dtype)
    count = kept.sum(dim=1)
    total = torch.where(kept, magnitude, 0.0).sum(dim=1)
    scale = torch.where(count > 0, total / count.clamp_min(1), 0.0)
    return codes, _scale(scale, power_of_two_scale)


def snap_to_power_of_two(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Nearest of {0, +-1, +-2, ..., +-top_code(bits)}, ties away from zero (eq. 28): int8
    [0.4, 0.5, 1.4, 1.5, -5, 47.9, 48, 100] -> [0, 1, 1, 2, -4, 32, 64, 64]."""
    levels = 2.0 ** torch.arange(bits - 1, dtype=x.dtype, device=x.device)
    midpoints = torch.cat([levels.new_tensor([0.5]), 1.5 * levels[:-1]])
    index = torch.searchsorted(midpoints, x.abs().contiguous(), right=True)
    magnitude = torch.cat([levels.new_zeros(1), levels])[index]
    return torch.copysign(magnitude, x)


def power_of_two_codes(
    rows: torch.Tensor, bits: int, power_of_two_scale: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row on {0, +-2^k} x scale: of the candidate scales (max|w| / top code down two
    octaves, eq. 29), the first one whose nearest codes leave the least squared error
    (eq. 30). Row [1.0, 0.3, -0.1] in int8 -> codes [64, 16, -8], scale 1/64."""
    base = (rows.abs().amax(dim=1) / top_code(bits)).clamp_min(MIN_SCALE)
    if power_of_two_scale:
        steps = torch.arange(OCTAVES + 1, dtype=rows.dtype, device=rows.device)
        candidates = 2.0 ** (torch.ceil(torch.log2(base))[None, :] - steps[:, None])
    else:
        steps = torch.arange(OCTAVES * STEPS_PER_OCTAVE + 1, device=rows.device)
        candidates = base[None, :] * 2.0 ** -(steps.to(rows.dtype) / STEPS_PER_OCTAVE)[:, None]
    errors = torch.stack(
        [
            (snap_to_power_of_two(rows / s[:, None], bits) * s[:, None] - rows).square().sum(1)
            for s in candidates
        ]
    )
    best = _first_argmin(errors)
    scale = candidates[best, torch.arange(rows.shape[0], device=rows.device)].float()
    return snap_to_power_of_two(rows / scale.double()[:, None], bits), scale


GRIDS = {
    WeightGrid.BINARY: lambda rows, scheme: binarize(rows, scheme.power_of_two_scale),
    WeightGrid.TERNARY: lambda rows, scheme: ternarize(rows, scheme.power_of_two_scale),
    WeightGrid.POWER_OF_TWO: lambda rows, scheme: power_of_two_codes(
        rows, scheme.bits, scheme.power_of_two_scale
    ),
}


class LowBitWeight(nn.Module):
    """A weight's low-bit grid as a module: forward `codes * scale` (float32, exactly
    `qdq.lowbit.grid_codes`), gradient straight through to the float weight.

    `scheme` says the storage bits, the granularity (`PerChannel(axis)`: one scale per slice
    along `axis` of the weight as torch holds it) and whether scales are powers of two."""

    def __init__(self, grid: WeightGrid | str, scheme: QScheme) -> None:
        super().__init__()
        self.grid = WeightGrid(grid)
        check_grid(self.grid, scheme)
        self.scheme = scheme
        self.axis = scheme.granularity.axis if isinstance(scheme.granularity, PerChannel) else None

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        codes, scale = self.codes_and_scale(w)
        exact = codes.to(w.dtype) * self._along(scale.to(w.dtype), w.ndim)
        return exact + (w - w.detach())  # the value of `exact`, the gradient of `w`

    def codes_and_scale(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Integer-valued codes shaped as `w` and float32 scales, (C,) per channel or () per
        tensor, computed without gradient."""
        with torch.no_grad():
            rows = self._rows(w.detach().double())
            codes, scale = GRIDS[self.grid](rows, self.scheme)
            if self.axis is None:
                return codes.reshape(w.shape), scale.float().reshape(())
            moved = codes.reshape(w.shape[self.axis], *_others(w.shape, self.axis))
            return torch.movedim(moved, 0, self.axis), scale.float()

    def _rows(self, w: torch.Tensor) -> torch.Tensor:
        if self.axis is None:
            return w.reshape(1, -1)
        return torch.movedim(w, self.axis, 0).reshape(w.shape[self.axis], -1)

    def _along(self, scale: torch.Tensor, ndim: int) -> torch.Tensor:
        if self.axis is None:
            return scale
        shape = [1] * ndim
        shape[self.axis] = -1
        return scale.reshape(shape)

    def extra_repr(self) -> str:
        return f"grid={self.grid}, bits={self.scheme.bits}, axis={self.axis}"


def _scale(mean: torch.Tensor, power_of_two_scale: bool) -> torch.Tensor:
    """float32 scale per row from a float64 one, as `qdq.lowbit._scale`: floored at MIN_SCALE,
    or the power of two nearest it (ties to the larger)."""
    mean = mean.clamp_min(MIN_SCALE)
    if power_of_two_scale:
        lower = 2.0 ** torch.floor(torch.log2(mean))
        mean = torch.where(mean - lower >= 2 * lower - mean, 2 * lower, lower)
    return mean.float()


def _first_argmin(errors: torch.Tensor) -> torch.Tensor:
    """Index of the first minimum down dim 0 (NumPy's argmin tie rule: the larger scale)."""
    smallest = errors.min(dim=0, keepdim=True).values
    order = torch.arange(errors.shape[0], device=errors.device)[:, None].expand_as(errors)
    return torch.where(errors == smallest, order, errors.shape[0]).min(dim=0).values


def _others(shape: torch.Size, axis: int) -> tuple[int, ...]:
    return tuple(d for i, d in enumerate(shape) if i != axis)
