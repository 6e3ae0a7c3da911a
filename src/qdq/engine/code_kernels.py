"""Kernels of the ops a graph applies to integer codes as integers (Relu, Clip, MaxPool,
Reshape, Flatten: the executor's `INTEGER_ONLY`) and Identity: exact, with no scale or zero
point, unlike the real-valued ops of `real_value_kernels`.
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from qdq.engine.context import Context, padded_inputs
from qdq.engine.depthwise import max_pool_pixels
from qdq.engine.pixels import as_pixels, from_pixels
from qdq.onnx.conv import ConvGeometry


def relu(ctx: Context, inputs: list, attrs: dict) -> list:
    return [np.maximum(inputs[0], np.zeros((), inputs[0].dtype))]


def clip(ctx: Context, inputs: list, attrs: dict) -> list:
    x, low, high = padded_inputs(inputs, 3)
    low = attrs.get("min", low)
    high = attrs.get("max", high)
    return [np.clip(x, low, high).astype(x.dtype)]


def identity(ctx: Context, inputs: list, attrs: dict) -> list:
    return [inputs[0]]


def max_pool(ctx: Context, inputs: list, attrs: dict) -> list | None:
    """MaxPool of integer codes (exact: a maximum), 2-D, floor mode, one output; padding
    never wins (the type's minimum). Other forms return None: ONNX Runtime runs them."""
    x = inputs[0]
    if x.ndim != 4 or attrs.get("ceil_mode", 0) or attrs.get("storage_order", 0):
        return None
    kernel = tuple(attrs["kernel_shape"])
    geometry = ConvGeometry.from_attributes(attrs | {"group": 1}, x.shape, (1, 1, *kernel))
    top, left, bottom, right = geometry.pads
    (kh, kw), (dh, dw), (sh, sw) = geometry.kernel, geometry.dilations, geometry.strides
    if ctx.compiled:  # channels-last, as the compiled convolutions leave it
        height, width = x.shape[2] + top + bottom, x.shape[3] + left + right
        oh, ow = (height - (kh - 1) * dh - 1) // sh + 1, (width - (kw - 1) * dw - 1) // sw + 1
        out = ctx.empty((x.shape[0], oh, ow, x.shape[1]), x.dtype)
        lowest = np.iinfo(x.dtype).min
        max_pool_pixels(as_pixels(x), kh, kw, sh, sw, dh, dw, top, left, lowest, out)
        return [from_pixels(out)]
    lowest = np.iinfo(x.dtype).min
    padded = np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)), constant_values=lowest)
    span = ((kh - 1) * dh + 1, (kw - 1) * dw + 1)
    windows = sliding_window_view(padded, span, axis=(2, 3))[:, :, ::sh, ::sw, ::dh, ::dw]
    out = windows[..., 0, 0].copy()
    for i in range(kh):  # a pass per tap: NumPy reduces a strided window view slowly
        for j in range(kw):
            np.maximum(out, windows[..., i, j], out=out)
    return [out]


def reshape(ctx: Context, inputs: list, attrs: dict) -> list:
    """Reshape: a 0 in the shape keeps the input's dim there (unless allowzero), -1 infers."""
    x, shape = inputs[:2]
    keep = not attrs.get("allowzero", 0)
    dims = [x.shape[i] if d == 0 and keep else int(d) for i, d in enumerate(shape)]
    return [x.reshape(dims)]


def flatten(ctx: Context, inputs: list, attrs: dict) -> list:
    x = inputs[0]
    axis = attrs.get("axis", 1)
    axis = axis + x.ndim if axis < 0 else axis
    return [x.reshape(int(np.prod(x.shape[:axis])), int(np.prod(x.shape[axis:])))]
