"""Convolutions, Gemm, pooling and Resize as torch functions: the ops over spatial windows
and matrices, with ONNX's pads and auto_pad resolved here (`_spatial_pads`, `_padded`)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch.nn import functional as F  # noqa: N812 (torch's own spelling)

from qdq.errors import ModelError
from qdq.qat.ops_args import Attrs, Value, as_ints, input_or_none


def _spatial_pads(attrs: Attrs, x: torch.Tensor, kernel: Sequence[int]) -> list[int]:
    """ONNX pads (begins then ends) with auto_pad resolved against `x`'s spatial shape."""
    n = len(kernel)
    auto = attrs.get("auto_pad", b"NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    if auto in ("NOTSET", ""):
        return list(attrs.get("pads", [0] * 2 * n))
    if auto == "VALID":
        return [0] * 2 * n
    strides = attrs.get("strides", [1] * n)
    dilations = attrs.get("dilations", [1] * n)
    begins, ends = [], []
    for size, k, s, d in zip(x.shape[2:], kernel, strides, dilations, strict=True):
        total = max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)
        small = total // 2
        begins.append(small if auto == "SAME_UPPER" else total - small)
        ends.append(total - begins[-1])
    return begins + ends


def _padded(x: torch.Tensor, pads: list[int], value: float = 0.0) -> tuple[torch.Tensor, list]:
    """`x` padded explicitly where begins and ends differ; the symmetric pads left to the op."""
    n = len(pads) // 2
    if pads[:n] == pads[n:]:
        return x, pads[:n]
    torch_pads = [p for i in reversed(range(n)) for p in (pads[i], pads[n + i])]
    return F.pad(x, torch_pads, value=value), [0] * n


def conv(inputs: Sequence[Value], attrs: Attrs) -> torch.Tensor:
    x, w, b = inputs[0], inputs[1], input_or_none(inputs, 2)
    kernel = list(w.shape[2:])
    x, pads = _padded(x, _spatial_pads(attrs, x, kernel))
    fn = (F.conv1d, F.conv2d, F.conv3d)[len(kernel) - 1]
    strides = attrs.get("strides", [1] * len(kernel))
    dilations = attrs.get("dilations", [1] * len(kernel))
    return fn(x, w, b, strides, pads, dilations, attrs.get("group", 1))


def conv_transpose(inputs: Sequence[Value], attrs: Attrs) -> torch.Tensor:
    x, w, b = inputs[0], inputs[1], input_or_none(inputs, 2)
    n = w.ndim - 2
    pads = list(attrs.get("pads", [0] * 2 * n))
    if pads[:n] != pads[n:] or "output_shape" in attrs:
        raise ModelError("ConvTranspose with asymmetric pads or output_shape has no converter")
    fn = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[n - 1]
    return fn(
        x,
        w,
        b,
        attrs.get("strides", [1] * n),
        pads[:n],
        attrs.get("output_padding", [0] * n),
        attrs.get("group", 1),
        attrs.get("dilations", [1] * n),
    )


def gemm(inputs: Sequence[Value], attrs: Attrs) -> torch.Tensor:
    a, b, c = inputs[0], inputs[1], input_or_none(inputs, 2)
    a = a.transpose(0, 1) if attrs.get("transA", 0) else a
    b = b.transpose(0, 1) if attrs.get("transB", 0) else b
    y = attrs.get("alpha", 1.0) * (a @ b)
    return y if c is None else y + attrs.get("beta", 1.0) * c


def pool(inputs: Sequence[Value], attrs: Attrs, kind: str) -> torch.Tensor:
    x, kernel = inputs[0], list(attrs["kernel_shape"])
    n = len(kernel)
    fill = -math.inf if kind == "max" else 0.0
    spatial = _spatial_pads(attrs, x, kernel)
    padded, pads = _padded(x, spatial, fill)
    strides = attrs.get("strides", [1] * n)
    ceil = bool(attrs.get("ceil_mode", 0))
    if kind == "max":
        fn = (F.max_pool1d, F.max_pool2d, F.max_pool3d)[n - 1]
        return fn(padded, kernel, strides, pads, attrs.get("dilations", [1] * n), ceil)
    fn = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)[n - 1]
    include = bool(attrs.get("count_include_pad", 0))
    if include or padded is x:  # symmetric pads are the op's own, counted as asked
        return fn(padded, kernel, strides, pads, ceil, include)
    # uneven pads made explicit are cells to torch: each window's sum over its real cells
    real, _ = _padded(torch.ones_like(x[:, :1]), spatial)
    window = (kernel, strides, pads, ceil, True)
    return fn(padded, *window) / fn(real, *window)


def resize(inputs: Sequence[Value], attrs: Attrs) -> torch.Tensor:
    x = inputs[0]
    scales, sizes = input_or_none(inputs, 2), input_or_none(inputs, 3)
    if sizes is not None and sizes.numel():
        size = as_ints(sizes)[2:]
    else:
        size = [math.floor(d * s) for d, s in zip(x.shape[2:], scales.tolist()[2:], strict=True)]
    mode = attrs.get("mode", b"nearest").decode()
    transform = attrs.get("coordinate_transformation_mode", b"half_pixel").decode()
    if mode == "nearest":  # ONNX's rounding lands on torch's floor for integer upsampling
        return F.interpolate(x, size=size, mode="nearest")
    if mode == "linear" and transform in ("half_pixel", "pytorch_half_pixel", "align_corners"):
        torch_mode = ("linear", "bilinear", "trilinear")[len(size) - 1]
        return F.interpolate(x, size, mode=torch_mode, align_corners=transform == "align_corners")
    raise ModelError(f"Resize mode {mode} with {transform} coordinates has no converter")
