"""Convolutions, Gemm, pooling and Resize as torch functions: the ops over spatial windows
and matrices, with ONNX's pads and auto_pad resolved here (`_spatial_pads`, `_padded`)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
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


def _padded(
    x: torch.Tensor, pads: list[int], value: float = 0.0, explicit: bool = False
) -> tuple[torch.Tensor, list]:
    """`x` padded explicitly where begins and ends differ (or `explicit`); the symmetric pads
    left to the op."""
    n = len(pads) // 2
    if pads[:n] == pads[n:] and not explicit:
        return x, pads[:n]
    if not any(pads):
        return x, [0] * n
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
    auto = attrs.get("auto_pad", b"NOTSET")
    if pads[:n] != pads[n:] or "output_shape" in attrs or auto not in (b"NOTSET", b"VALID", b""):
        raise ModelError(
            "ConvTranspose with asymmetric pads, output_shape or a SAME auto_pad has no converter"
        )
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
    """Pads torch cannot take (uneven, or over half the window) made explicit; refused: an
    average pool's dilations, MaxPool's indices, ceil_mode past explicit pads (whose last
    window ONNX Runtime and torch keep apart)."""
    x, kernel = inputs[0], list(attrs["kernel_shape"])
    n = len(kernel)
    dilations = attrs.get("dilations", [1] * n)
    if attrs["made"] > 1 or (kind != "max" and any(d != 1 for d in dilations)):
        raise ModelError("MaxPool's indices and a dilated AveragePool have no converter")
    fill = -math.inf if kind == "max" else 0.0
    spatial = _spatial_pads(attrs, x, kernel)
    reach = [(k - 1) * d + 1 for k, d in zip(kernel, dilations, strict=True)]
    wide = any(p > r // 2 for p, r in zip(spatial, reach * 2, strict=True))
    padded, pads = _padded(x, spatial, fill, explicit=wide)
    strides = attrs.get("strides", [1] * n)
    ceil = bool(attrs.get("ceil_mode", 0))
    if ceil and padded is not x:
        raise ModelError("a pool with ceil_mode and uneven or wide pads has no converter")
    if kind == "max":
        fn = (F.max_pool1d, F.max_pool2d, F.max_pool3d)[n - 1]
        return fn(padded, kernel, strides, pads, dilations, ceil)
    fn = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)[n - 1]
    include = bool(attrs.get("count_include_pad", 0))
    if include or padded is x:  # symmetric pads are the op's own, counted as asked
        return fn(padded, kernel, strides, pads, ceil, include)
    # uneven pads made explicit are cells to torch: each window's sum over its real cells
    real, _ = _padded(torch.ones_like(x[:, :1]), spatial, explicit=wide)
    window = (kernel, strides, pads, ceil, True)
    return fn(padded, *window) / fn(real, *window)


def resize(inputs: Sequence[Value], attrs: Attrs) -> torch.Tensor:
    """ONNX's Resize over the spatial axes: nearest by ONNX's own coordinates and rounding (an
    index per output position), linear by torch's interpolation with the given scales; what
    neither matches (cubic, antialias, axes, an aspect policy, a roi, scaled batch or channel
    axes) is refused."""
    x = inputs[0]
    opset10 = len(inputs) == 2  # (X, scales): before roi and sizes
    scales = inputs[1] if opset10 else input_or_none(inputs, 2)
    sizes = None if opset10 else input_or_none(inputs, 3)
    mode = _text(attrs, "mode", "nearest")
    transform = _text(
        attrs, "coordinate_transformation_mode", "asymmetric" if opset10 else "half_pixel"
    )
    policy = _text(attrs, "keep_aspect_ratio_policy", "stretch")
    if attrs.get("antialias", 0) or "axes" in attrs or policy != "stretch":
        raise ModelError("Resize with antialias, axes or an aspect ratio policy has no converter")
    if sizes is not None and sizes.numel():
        shape = as_ints(sizes)
        given = None
    else:
        given = [float(v) for v in scales.tolist()]
        shape = [math.floor(d * s) for d, s in zip(x.shape, given, strict=True)]
    if list(shape[:2]) != list(x.shape[:2]):
        raise ModelError("Resize of the batch or channel axis has no converter")
    spatial = [given[i] if given else shape[i] / x.shape[i] for i in range(2, x.ndim)]
    if mode == "nearest" and transform != "tf_crop_and_resize":
        rounding = _text(attrs, "nearest_mode", "round_prefer_floor")
        for axis, scale in zip(range(2, x.ndim), spatial, strict=True):
            index = _nearest(x.shape[axis], shape[axis], scale, transform, rounding)
            x = x.index_select(axis, index)
        return x
    size = shape[2:]
    if mode == "linear" and transform in ("half_pixel", "pytorch_half_pixel", "align_corners"):
        if transform == "pytorch_half_pixel" and 1 in size:
            raise ModelError("Resize pytorch_half_pixel to a length of 1 has no converter")
        torch_mode = ("linear", "bilinear", "trilinear")[len(size) - 1]
        corners = transform == "align_corners"
        if given and not corners:  # the coordinates follow the scale given, not the size ratio
            return F.interpolate(x, scale_factor=spatial, mode=torch_mode, align_corners=False,
                                 recompute_scale_factor=False)  # fmt: skip
        return F.interpolate(x, size, mode=torch_mode, align_corners=corners)
    raise ModelError(f"Resize mode {mode} with {transform} coordinates has no converter")


def _text(attrs: Attrs, name: str, default: str) -> str:
    value = attrs.get(name, default)
    return value.decode() if isinstance(value, bytes) else value


def _nearest(length: int, out: int, scale: float, transform: str, rounding: str) -> torch.Tensor:
    """The input index each of `out` positions reads, as ONNX Runtime computes it (float32)."""
    j = np.arange(out, dtype=np.float32)
    s = np.float32(scale)
    if transform in ("half_pixel", "pytorch_half_pixel"):
        x = (j + np.float32(0.5)) / s - np.float32(0.5)
        x = np.zeros_like(x) if transform == "pytorch_half_pixel" and out == 1 else x
    elif transform == "align_corners":
        x = j * np.float32((length - 1) / (out - 1)) if out > 1 else np.zeros_like(j)
    elif transform == "asymmetric":
        x = j / s
    elif transform == "tf_half_pixel_for_nn":
        x = (j + np.float32(0.5)) / s
    elif transform == "half_pixel_symmetric":
        adjustment = np.float32(out / (scale * length))
        offset = np.float32(length / 2) * (np.float32(1) - adjustment)
        x = offset + (j + np.float32(0.5)) / s - np.float32(0.5)
    else:
        raise ModelError(f"Resize nearest with {transform} coordinates has no converter")
    picks = {
        "round_prefer_floor": lambda v: np.ceil(v - np.float32(0.5)),
        "round_prefer_ceil": lambda v: np.floor(v + np.float32(0.5)),
        "floor": np.floor,
        "ceil": np.ceil,
    }
    if rounding not in picks:
        raise ModelError(f"Resize nearest_mode {rounding} has no converter")
    return torch.from_numpy(np.clip(picks[rounding](x), 0, length - 1).astype(np.int64))
