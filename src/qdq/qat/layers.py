"""Conv and Linear layers whose weight is fake quantized, with a following BatchNorm folded in.

BatchNorm folding follows Krishnamoorthi 2018 (§3.2, as torch.ao's ConvBn modules do): the
weight is quantized as it will be deployed, folded with the running statistics,
`w_fold = w * gamma / sqrt(var + eps)`. For the first `freeze_after` training steps the
BatchNorm still normalizes with the batch's statistics (and updates its running ones): the
convolution with the folded quantized weight is divided back by `gamma / sigma` and the
BatchNorm applied. After that the statistics freeze and the layer computes exactly the folded
convolution the exported file holds: `conv(x, q(w_fold)) + beta + (b - mean) * gamma / sigma`.
"""

from __future__ import annotations

import torch
from torch import nn

FOLDABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
QUANTIZABLE = (*FOLDABLE, nn.Linear)


class QuantizedLayer(nn.Module):
    """`layer` (Conv1d/2d/3d or Linear) computing with `weight_quantizer(w_fold)`.

    `weight_quantizer` is a `FakeQuantize` (uniform grid, LSQ scale), a `LowBitWeight`
    (binary, ternary, power-of-two) or `nn.Identity` (the layer stays float)."""

    def __init__(
        self,
        layer: nn.Module,
        batchnorm: nn.Module | None = None,
        freeze_after: int = 0,
    ) -> None:
        super().__init__()
        self.layer, self.batchnorm = layer, batchnorm
        self.weight_quantizer: nn.Module = nn.Identity()
        self.freeze_after = freeze_after
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    @property
    def frozen(self) -> bool:
        """Whether the BatchNorm's statistics are frozen (or there is none)."""
        return self.batchnorm is None or int(self.steps) >= self.freeze_after

    def freeze(self) -> None:
        """Stop updating the BatchNorm statistics now (the warm-up is over)."""
        self.steps.fill_(max(int(self.steps), self.freeze_after))

    def folded(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The weight and bias with the BatchNorm's running statistics folded in."""
        w, b = self.layer.weight, self.layer.bias
        if self.batchnorm is None:
            return w, b
        factor = self._factor()
        bias = b if b is not None else torch.zeros_like(factor)
        beta = self.batchnorm.bias if self.batchnorm.affine else torch.zeros_like(factor)
        folded_bias = beta + (bias - self.batchnorm.running_mean) * factor
        return w * factor.reshape(-1, *[1] * (w.ndim - 1)), folded_bias

    def quantized_weight(self) -> torch.Tensor:
        """The folded weight on its grid: what the exported file's integer codes hold."""
        return self.weight_quantizer(self.folded()[0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.frozen or not self.training:
            w, b = self.folded()
            return self._compute(x, self.weight_quantizer(w), b)
        self.steps += 1
        factor = self._factor()
        weight = self.layer.weight
        w = self.weight_quantizer(weight * factor.reshape(-1, *[1] * (weight.ndim - 1)))
        # a channel whose gamma is 0 has weight 0 and output beta: divide it by 1, not by 0
        divisor = torch.where(factor == 0, torch.ones_like(factor), factor)
        y = self._compute(x, w, None) / divisor.reshape(1, -1, *[1] * (x.ndim - 2))
        if self.layer.bias is not None:
            y = y + self.layer.bias.reshape(1, -1, *[1] * (x.ndim - 2))
        return self.batchnorm(y)  # batch statistics, running ones updated

    def to_float(self) -> nn.Module:
        """A plain layer holding the quantized folded weight and the folded bias."""
        w, b = self.folded()
        with torch.no_grad():
            plain = _like(self.layer, bias=b is not None)
            plain.weight.copy_(self.weight_quantizer(w))
            if b is not None:
                plain.bias.copy_(b)
        return plain

    def _factor(self) -> torch.Tensor:
        bn = self.batchnorm
        gamma = bn.weight if bn.affine else torch.ones_like(bn.running_var)
        return gamma / torch.sqrt(bn.running_var + bn.eps)

    def _compute(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        """The layer on `x` with weight `w` and bias `b` (not `_apply`: nn.Module's own, which
        `.to()`, `.cuda()` and `.float()` go through)."""
        if isinstance(self.layer, nn.Linear):
            return nn.functional.linear(x, w, b)
        return self.layer._conv_forward(x, w, b)


def _like(layer: nn.Module, bias: bool) -> nn.Module:
    """A fresh layer with `layer`'s geometry."""
    if isinstance(layer, nn.Linear):
        return nn.Linear(layer.in_features, layer.out_features, bias=bias)
    return type(layer)(
        layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding,
        layer.dilation, layer.groups, bias, layer.padding_mode,
    )  # fmt: skip
