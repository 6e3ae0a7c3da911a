"""Quantize, dequantize and fake-quantize NumPy arrays (docs/quantization.md, eq. 1-3).

Matches ONNX QuantizeLinear / DequantizeLinear bit for bit: `x / scale` in float32, round half
to even by default, add the zero point, saturate (eq. 2); `(q - zero_point) * scale` in float32
(eq. 1).
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

from qdq.errors import DataError, expect
from qdq.qparams import QParams
from qdq.scheme import PerBlock, PerTensor, Rounding


def quantize(x: np.ndarray, qparams: QParams) -> np.ndarray:
    """Integer codes of `x` (eq. 2), in the scheme's storage dtype.

    ONNX's golden table: scale 2, zero point 128, uint8 -> `[0, 2, 3, 1000, -254, -1000]` gives
    `[128, 129, 130, 255, 1, 0]` (3/2 = 1.5 rounds to even 2; 1000/2 + 128 saturates to 255).
    """
    codes = _round_and_shift(_as_float(x, "quantize"), qparams)
    return codes.astype(qparams.scheme.storage_dtype)


def dequantize(q: np.ndarray, qparams: QParams) -> np.ndarray:
    """Reals of integer codes `q` (eq. 1), as float32."""
    q = np.asarray(q)
    if not _is_integer_dtype(q.dtype):
        raise DataError(
            f"dequantize expects integer codes, got dtype {q.dtype}; call quantize first"
        )
    scale, zero_point = _expanded(qparams, q.shape)
    return (q.astype(np.float32) - zero_point.astype(np.float32)) * scale


def fake_quantize(x: np.ndarray, qparams: QParams) -> np.ndarray:
    """`dequantize(quantize(x))` in one float32 pass: what the integer model will see (eq. 3)."""
    codes = _round_and_shift(_as_float(x, "fake_quantize"), qparams)
    scale, zero_point = _expanded(qparams, codes.shape)
    return (codes - zero_point.astype(np.float32)) * scale


def round_to_int(v: np.ndarray, rounding: Rounding) -> np.ndarray:
    """Round floats to integral floats under `rounding`, exactly (no `+0.5` float tricks)."""
    if rounding is Rounding.HALF_EVEN:
        return np.rint(v)
    if rounding is Rounding.HALF_UP:
        floor = np.floor(v)
        return floor + (v - floor >= 0.5)
    magnitude = np.abs(v)
    floor = np.floor(magnitude)
    return np.copysign(floor + (magnitude - floor >= 0.5), v)


def _round_and_shift(x: np.ndarray, qparams: QParams) -> np.ndarray:
    """`clamp(round(x / scale) + zero_point, qmin, qmax)` as float32 codes (eq. 2)."""
    if np.isnan(x).any():
        raise DataError(
            f"cannot quantize NaN ({int(np.isnan(x).sum())} of {x.size} values); "
            "fix or drop those inputs"
        )
    scale, zero_point = _expanded(qparams, x.shape)
    codes = round_to_int(x / scale, qparams.scheme.rounding) + zero_point.astype(np.float32)
    return np.clip(codes, qparams.scheme.qmin, qparams.scheme.qmax)


def _as_float(x: np.ndarray, verb: str) -> np.ndarray:
    x = np.asarray(x)
    if x.dtype.kind != "f" and x.dtype != ml_dtypes.bfloat16:
        raise DataError(f"{verb} expects a float array, got dtype {x.dtype}; convert it first")
    return x.astype(np.float32, copy=False)


def _is_integer_dtype(dtype: np.dtype) -> bool:
    try:
        ml_dtypes.iinfo(dtype)
    except ValueError:
        return False
    return True


def _expanded(qparams: QParams, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Scale and zero point reshaped to broadcast against a tensor of `shape`."""
    expect(qparams, QParams, "qparams", "compute them with qdq.choose_qparams(range, scheme)")
    g = qparams.scheme.granularity
    scale, zero_point = qparams.scale, qparams.zero_point
    if isinstance(g, PerTensor):
        _check_shape(scale.shape, (), "per-tensor")
        return scale, zero_point
    axis = _normalize_axis(g.axis, len(shape))
    block = g.block_size if isinstance(g, PerBlock) else 0
    want = list(shape)
    want[axis] = -(-shape[axis] // block) if block else shape[axis]
    _check_shape(scale.shape, tuple(want) if block else (shape[axis],), g.__class__.__name__)
    return broadcast_qparam(scale, shape, axis, block), broadcast_qparam(
        zero_point, shape, axis, block
    )


def broadcast_qparam(
    param: np.ndarray, shape: tuple[int, ...], axis: int, block: int
) -> np.ndarray:
    """A scale or zero point shaped to broadcast against a tensor of `shape`, as ONNX's
    QuantizeLinear reads it: a scalar, one value per slice along `axis`, or (block > 0) one value
    per `block` elements along `axis`, the short last block cut."""
    if param.ndim == 0 or (param.size == 1 and not block):
        return param.reshape(())
    axis = axis % len(shape)
    if block:
        repeated = np.repeat(param, block, axis=axis)
        return np.take(repeated, np.arange(shape[axis]), axis=axis)
    view = [1] * len(shape)
    view[axis] = param.size
    return param.reshape(view)


def _normalize_axis(axis: int, ndim: int) -> int:
    if not -ndim <= axis < ndim:
        raise DataError(f"axis {axis} is out of range for a tensor of rank {ndim}")
    return axis % ndim


def _check_shape(got: tuple[int, ...], want: tuple[int, ...], kind: str) -> None:
    if got != want:
        raise DataError(
            f"{kind} qparams have shape {got} but this tensor needs {want}; "
            "compute them from a range of that tensor"
        )
