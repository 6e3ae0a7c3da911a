"""QuantizeLinear, DequantizeLinear and DynamicQuantizeLinear as ONNX defines them (opset 10-25):
per tensor, per axis and blocked; int2 to int16 and the float8 / float4 types."""

from __future__ import annotations

import ml_dtypes
import numpy as np
from onnx import helper, numpy_helper

from qdq.affine import broadcast_qparam

FLOAT8 = {
    np.dtype(ml_dtypes.float8_e4m3fn),
    np.dtype(ml_dtypes.float8_e4m3fnuz),
    np.dtype(ml_dtypes.float8_e5m2),
    np.dtype(ml_dtypes.float8_e5m2fnuz),
}
FLOAT4 = {np.dtype(ml_dtypes.float4_e2m1fn)}


def output_type(zero_point: np.ndarray | None, output_dtype: int) -> np.dtype:
    if zero_point is not None:
        return zero_point.dtype
    if output_dtype:
        return np.dtype(helper.tensor_dtype_to_np_dtype(output_dtype))
    return np.dtype(np.uint8)


def quantize_linear(
    x: np.ndarray,
    scale: np.ndarray,
    zero_point: np.ndarray | None = None,
    *,
    axis: int = 1,
    block_size: int = 0,
    saturate: int = 1,
    output_dtype: int = 0,
) -> np.ndarray:
    """y = saturate(round_half_even(x / scale) + zero_point) (eq. 2)."""
    dtype = output_type(zero_point, output_dtype)
    scaled = np.asarray(x / broadcast_qparam(scale, x.shape, axis, block_size))
    if dtype in FLOAT8:
        if saturate:
            return numpy_helper.saturate_cast(scaled.astype(np.float32), dtype)
        return scaled.astype(dtype)
    if dtype in FLOAT4:
        zp = 0 if zero_point is None else broadcast_qparam(zero_point, x.shape, axis, block_size)
        return (scaled + np.asarray(zp, np.float32)).astype(dtype)
    info = ml_dtypes.iinfo(dtype)
    zp = 0 if zero_point is None else broadcast_qparam(zero_point, x.shape, axis, block_size)
    if scaled.dtype == np.float32 and dtype.itemsize <= 2:
        # MLAS's order (clamp to [qmin - z, qmax - z], round, add z) in float32: the same codes
        # as rounding first, since the bounds are integers, in in-place passes (fmax: a NaN
        # takes the lowest code, as MLAS gives it)
        low = np.asarray(info.min - np.asarray(zp, np.int32), np.float32)
        high = np.asarray(info.max - np.asarray(zp, np.int32), np.float32)
        np.fmax(scaled, low, out=scaled)
        np.minimum(scaled, high, out=scaled)
        np.rint(scaled, out=scaled)
        scaled += np.asarray(zp, np.float32)
        return scaled.astype(dtype)
    codes = np.rint(scaled.astype(np.float64)) + np.asarray(zp, np.float64)
    return np.clip(codes, info.min, info.max).astype(dtype)


def dequantize_linear(
    x: np.ndarray,
    scale: np.ndarray,
    zero_point: np.ndarray | None = None,
    *,
    axis: int = 1,
    block_size: int = 0,
    output_dtype: int = 0,
) -> np.ndarray:
    """y = (x - zero_point) * scale (eq. 1), in the scale's float type."""
    values = x.astype(np.float32)
    if zero_point is not None and x.dtype not in FLOAT8:
        zp = broadcast_qparam(zero_point.astype(np.float32), x.shape, axis, block_size)
        values = values - zp
    result = values * broadcast_qparam(scale.astype(np.float32), x.shape, axis, block_size)
    dtype = helper.tensor_dtype_to_np_dtype(output_dtype) if output_dtype else scale.dtype
    return result.astype(dtype)


def dynamic_quantize_linear(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """uint8 codes, scale and zero point from the tensor's own range, 0 included (ONNX spec);
    an empty or all-zero tensor gets scale 1, as ONNX Runtime gives it."""
    hi = np.float32(max(0.0, float(np.max(x, initial=0.0))))
    lo = np.float32(min(0.0, float(np.min(x, initial=0.0))))
    scale = np.float32(1.0) if hi == lo else np.float32(hi - lo) / np.float32(255)
    zero_point = np.rint(np.clip(np.float32(0) - lo / scale, 0, 255))
    codes = np.clip(np.rint(x / scale) + zero_point, 0, 255)
    return (
        codes.astype(np.uint8),
        np.array(scale, dtype=x.dtype),
        np.array(zero_point, dtype=np.uint8),
    )
