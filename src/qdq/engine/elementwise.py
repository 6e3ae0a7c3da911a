"""Elementwise ops in one compiled pass (Numba): the engine's fast path where a plan keeps
float ops between integer ones (PP-OCR's detector keeps its HardSwish activations float:
DequantizeLinear, HardSigmoid, Mul, QuantizeLinear on every large activation).

QuantizeLinear and DequantizeLinear per tensor follow `quantize_ops`' float32 arithmetic
element by element: `x / s` in float32, clamped to [q_min - z, q_max - z], rounded half to
even, plus z; and `(q - z) * s` in float32. The float ops are the single IEEE operations
ONNX Runtime's kernels perform: Add and Mul of tensors of one shape and layout (or a
scalar), and HardSigmoid as `min(max(x * alpha + beta, 0), 1)` with no fused multiply-add
(ONNX Runtime's, bit for bit: docs/engine.md). Tensors are read in their memory order (a
channels-last view as it lies) and results are laid out the same way; any other form
returns None and ONNX Runtime runs the node.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from qdq.engine.jit import compile_kernel
from qdq.engine.pixels import as_pixels, fresh, from_pixels

CODES = (np.dtype(np.uint8), np.dtype(np.int8))


def _quantize(x, scale, zero_point, low, high, out):
    for i in range(x.size):
        value = np.float32(x[i] / scale)
        value = min(value, high) if value >= low else low  # NaN to the lowest code, as MLAS
        out[i] = np.int32(np.rint(value)) + zero_point


def _dequantize(x, zero_point, scale, out):
    for i in range(x.size):
        out[i] = (np.float32(x[i]) - zero_point) * scale


def _hard_sigmoid(x, alpha, beta, out):
    for i in range(x.size):
        out[i] = min(max(x[i] * alpha + beta, np.float32(0)), np.float32(1))


def _add(a, b, out):
    for i in range(a.size):
        out[i] = a[i] + b[i if b.size > 1 else 0]


def _mul(a, b, out):
    for i in range(a.size):
        out[i] = a[i] * b[i if b.size > 1 else 0]


_quantize = compile_kernel(_quantize)
_dequantize = compile_kernel(_dequantize)
_hard_sigmoid = compile_kernel(_hard_sigmoid)
_add = compile_kernel(_add)
_mul = compile_kernel(_mul)


def _in_memory_order(
    x: np.ndarray, dtype: np.dtype, allocate: Callable
) -> tuple[np.ndarray, np.ndarray] | None:
    """A result laid out as x is (row-major or channels-last), from `allocate`, and it as a
    flat view in memory order; None where x is laid out otherwise."""
    if x.flags.c_contiguous:
        out = allocate(x.shape, dtype)
        return out, out.reshape(-1)
    if x.ndim == 4 and as_pixels(x).flags.c_contiguous:
        pixels = allocate(as_pixels(x).shape, dtype)
        return from_pixels(pixels), pixels.reshape(-1)
    return None


def quantize(
    x: np.ndarray, scale: np.ndarray, zero_point: np.ndarray | None, allocate: Callable = fresh
) -> np.ndarray | None:
    """`quantize_ops.quantize_linear` of float32 x with one float32 scale onto uint8 or int8
    (the zero point's type, uint8 without one); None for any other form."""
    dtype = np.dtype(np.uint8) if zero_point is None else zero_point.dtype
    if x.dtype != np.float32 or scale.size != 1 or scale.dtype != np.float32:
        return None
    if dtype not in CODES or (zero_point is not None and zero_point.size != 1):
        return None
    if (laid := _in_memory_order(x, dtype, allocate)) is None:
        return None
    out, flat = laid
    z = 0 if zero_point is None else int(zero_point.reshape(()))
    info = np.iinfo(dtype)
    low, high = np.float32(info.min - z), np.float32(info.max - z)
    _quantize(x.ravel(order="K"), np.float32(scale.reshape(())[()]), np.int32(z), low, high, flat)
    return out


def dequantize(
    x: np.ndarray, scale: np.ndarray, zero_point: np.ndarray | None, allocate: Callable = fresh
) -> np.ndarray | None:
    """`quantize_ops.dequantize_linear` of uint8 or int8 codes with one float32 scale; None
    for any other form."""
    if x.dtype not in CODES or scale.size != 1 or scale.dtype != np.float32:
        return None
    if zero_point is not None and zero_point.size != 1:
        return None
    if (laid := _in_memory_order(x, np.dtype(np.float32), allocate)) is None:
        return None
    out, flat = laid
    z = np.float32(0 if zero_point is None else zero_point.reshape(())[()])
    _dequantize(x.ravel(order="K"), z, np.float32(scale.reshape(())[()]), flat)
    return out


def hard_sigmoid(
    x: np.ndarray, alpha: float, beta: float, allocate: Callable = fresh
) -> np.ndarray | None:
    """ONNX HardSigmoid of float32 x; None for any other form."""
    if x.dtype != np.float32 or (laid := _in_memory_order(x, x.dtype, allocate)) is None:
        return None
    out, flat = laid
    _hard_sigmoid(x.ravel(order="K"), np.float32(alpha), np.float32(beta), flat)
    return out


def binary(op: str, a: np.ndarray, b: np.ndarray, allocate: Callable = fresh) -> np.ndarray | None:
    """ONNX Add or Mul of float32 tensors of one shape and memory layout, or of a tensor and
    a scalar; None for any other form (broadcasting, other types)."""
    if a.size < b.size:  # both commute; the scalar second
        a, b = b, a
    if a.dtype != np.float32 or b.dtype != np.float32:
        return None
    if b.size != 1 and (a.shape != b.shape or a.strides != b.strides):
        return None
    if b.size == 1 and b.ndim > a.ndim:  # the result would take b's extra dims
        return None
    if (laid := _in_memory_order(a, a.dtype, allocate)) is None:
        return None
    out, flat = laid
    (_add if op == "Add" else _mul)(a.ravel(order="K"), b.ravel(order="K"), flat)
    return out


def _float_kernel(function):
    def kernel(ctx, inputs: list, attrs: dict) -> list | None:
        if any(x is None for x in inputs):
            return None
        result = function(inputs, attrs, ctx.empty)
        return None if result is None else [result]

    return kernel


# float ops of the fallback the compiled path runs itself: (domain, op) -> kernel, which
# returns None where ONNX Runtime must run the node
FLOAT_KERNELS = {
    ("", "Add"): _float_kernel(lambda inputs, attrs, allocate: binary("Add", *inputs, allocate)),
    ("", "Mul"): _float_kernel(lambda inputs, attrs, allocate: binary("Mul", *inputs, allocate)),
    ("", "HardSigmoid"): _float_kernel(
        lambda inputs, attrs, allocate: hard_sigmoid(
            inputs[0], attrs.get("alpha", 0.2), attrs.get("beta", 0.5), allocate
        )
    ),
}
