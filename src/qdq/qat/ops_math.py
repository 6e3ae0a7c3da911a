"""Elementwise math, Softmax, the reductions and the normalizations as torch functions, and
the adapters that turn a torch function of tensors into an op of the `OPS` table."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch.nn import functional as F  # noqa: N812 (torch's own spelling)

from qdq.errors import ModelError
from qdq.qat.ops_args import Attrs, Value, axes_of, input_or_none


def clip(inputs: Sequence[Value], attrs: Attrs) -> torch.Tensor:
    """Bounds as the input's type (an integer Clip stays integer); none given: the input."""
    x = inputs[0]
    low, high = input_or_none(inputs, 1), input_or_none(inputs, 2)
    low = low.item() if low is not None else attrs.get("min")
    high = high.item() if high is not None else attrs.get("max")
    return x if low is None and high is None else torch.clamp(x, low, high)


def softmax(inputs: Sequence[Value], attrs: Attrs) -> torch.Tensor:
    """`opset` (set when the graph is read) < 13: over the axes from `axis` on, as one."""
    x = inputs[0]
    axis = attrs.get("axis", -1 if attrs["opset"] >= 13 else 1) % x.ndim
    if attrs["opset"] >= 13 or axis == x.ndim - 1:
        return torch.softmax(x, axis)
    return torch.softmax(x.flatten(axis), axis).reshape(x.shape)


def reduce(inputs: Sequence[Value], attrs: Attrs, fn: Callable) -> torch.Tensor:
    """Over `axes`; none given: every axis, or none at all with `noop_with_empty_axes`."""
    x, axes = inputs[0], axes_of(inputs, attrs)
    if not axes and attrs.get("noop_with_empty_axes", 0):
        return x
    if fn is torch.mean and not x.is_floating_point():
        raise ModelError("ReduceMean of integers has no converter")
    axes = axes or list(range(x.ndim))
    return fn(x, dim=axes, keepdim=bool(attrs.get("keepdims", 1)))


def layer_norm(inputs: Sequence[Value], attrs: Attrs) -> torch.Tensor:
    """Over the axes from `axis` on; a scale or bias of another shape broadcasts after."""
    if attrs["made"] > 1:
        raise ModelError("LayerNormalization's mean and deviation outputs have no converter")
    x, scale, bias = inputs[0], inputs[1], input_or_none(inputs, 2)
    shape = x.shape[attrs.get("axis", -1) % x.ndim :]
    epsilon = attrs.get("epsilon", 1e-5)
    if scale.shape == shape and (bias is None or bias.shape == shape):
        return F.layer_norm(x, shape, scale, bias, epsilon)
    y = F.layer_norm(x, shape, eps=epsilon) * scale
    return y if bias is None else y + bias


def instance_norm(inputs: Sequence[Value], attrs: Attrs) -> torch.Tensor:
    """InstanceNormalization: each sample's channel normalized over its other axes (PyTorch
    exports GroupNorm and InstanceNorm as it)."""
    x, scale, bias = inputs[:3]
    return F.instance_norm(x, weight=scale, bias=bias, eps=attrs.get("epsilon", 1e-5))


def einsum(inputs: Sequence[Value], attrs: Attrs) -> torch.Tensor:
    return torch.einsum(attrs["equation"].decode(), *inputs)


def trilu(inputs: Sequence[Value], attrs: Attrs) -> torch.Tensor:
    """The upper (or, with `upper` 0, lower) triangle of the last two axes from diagonal `k`
    on (a causal attention mask)."""
    k = input_or_none(inputs, 1)
    k = 0 if k is None else int(k)
    return torch.triu(inputs[0], k) if attrs.get("upper", 1) else torch.tril(inputs[0], k)


def batch_norm(inputs: Sequence[Value], attrs: Attrs) -> torch.Tensor:
    x, scale, bias, mean, var = inputs[:5]
    return F.batch_norm(x, mean, var, scale, bias, False, 0.0, attrs.get("epsilon", 1e-5))


def prelu(inputs: Sequence[Value], attrs: Attrs) -> torch.Tensor:
    x, slope = inputs
    return torch.where(x >= 0, x, x * slope)


def divide(inputs: Sequence[Value], attrs: Attrs) -> torch.Tensor:
    """ONNX's Div: integers truncate toward zero (shape arithmetic), floats divide."""
    a, b = inputs
    integer = not (a.is_floating_point() or b.is_floating_point())
    return torch.div(a, b, rounding_mode="trunc") if integer else torch.div(a, b)


def elementwise(fn: Callable) -> Callable[[Sequence[Value], Attrs], torch.Tensor]:
    return lambda inputs, attrs: fn(*inputs)


def variadic(fn: Callable) -> Callable[[Sequence[Value], Attrs], torch.Tensor]:
    def run(inputs: Sequence[Value], attrs: Attrs) -> torch.Tensor:
        out = inputs[0]
        for x in inputs[1:]:
            out = fn(out, x)
        return out

    return run
