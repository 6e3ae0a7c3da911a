"""ONNX Runtime's own arithmetic for the ops ONNX defines on real values (requant="float").

QLinearAdd/Mul, the pools, QLinearConcat and the lookup ops are defined as "dequantize, compute,
quantize"; ONNX Runtime's CPU kernels (MLAS on x86-64: its AVX2, FMA3 and SSE2 routines) compute
them in float32 in a particular order, and on near ties that order decides the code. Each
function below follows one MLAS routine step by step (docs/engine.md, "Requantization"), so
that the engine gives ONNX Runtime's codes on every element; `requant="spec"` keeps the literal
float64 definition.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from qdq.engine.integer import requantize_mlas
from qdq.engine.pixels import as_pixels, channels_last, from_pixels
from qdq.engine.spans import add_spans, mul_spans, spans
from qdq.onnx.conv import ConvGeometry

F32 = np.float32


def _int(value: np.ndarray) -> int:
    """A scalar zero point (a 0-d or one-element tensor) as a Python int."""
    return int(np.asarray(value).reshape(-1)[0])


def _f32(value: np.ndarray) -> np.float32:
    """A scalar scale (a 0-d or one-element tensor) as a float32."""
    return F32(np.asarray(value).reshape(-1)[0])


def fma32(a: np.ndarray, b: np.ndarray | np.float32, c: np.ndarray | np.float32) -> np.ndarray:
    """float32 fused multiply-add `round32(a * b + c)`, rounded once (vfmadd). The product of
    two float32 (or a code and a float32) is exact in float64; where the float64 sum lands
    exactly halfway between two float32, its rounding error (TwoSum) picks the side that the
    exact sum lies on, so the result is the FMA's, not a twice-rounded one."""
    product, addend = np.float64(1) * a * np.float64(b), np.float64(1) * c
    total = product + addend
    back = total - product
    error = (product - (total - back)) + (addend - back)
    rounded = total.astype(F32)
    other = np.nextafter(rounded, np.where(total > rounded, np.inf, -np.inf).astype(F32))
    halfway = (rounded.astype(np.float64) + other) / 2 == total
    return np.where(halfway & (error != 0) & ((error > 0) == (other > rounded)), other, rounded)


# Eigen's rational approximation of the logistic function, MLAS's `MlasLogisticConstants`:
# p's odd coefficients alpha_9 .. alpha_1, q's even ones beta_10 .. beta_0.
_ALPHA = F32([4.37031012579801e-11, 1.15627324459942e-07, 6.08574864600143e-05,
              8.51377133304701e-03, 2.48287947061529e-01])  # fmt: skip
_BETA = F32([6.10247389755681e-13, 5.76102136993427e-09, 6.29106785017040e-06,
             1.70198817374094e-03, 1.16817656904453e-01, 9.93151921023180e-01])  # fmt: skip


def logistic(x: np.ndarray) -> np.ndarray:
    """`MlasLogisticKernelFma3` (MlasComputeLogistic on x86-64, QLinearSigmoid's table): x
    clamped to [-18, 18], `p = x * P(x^2)` and `q = Q(x^2)` by Horner steps as float32 FMAs,
    then `p / q + 0.5` clamped below at 0, all in float32. Not `1 / (1 + exp(-x))`: on near
    ties the two give different codes."""
    x = np.clip(np.asarray(x, F32), F32(-18), F32(18))
    square = x * x
    p, q = fma32(square, _ALPHA[0], _ALPHA[1]), fma32(square, _BETA[0], _BETA[1])
    for alpha in _ALPHA[2:]:
        p = fma32(p, square, alpha)
    for beta in _BETA[2:]:
        q = fma32(q, square, beta)
    return np.maximum((x * p) / q + F32(0.5), F32(0))


def convert_and_pack(value: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """float32 values to codes as `cvtps2dq` then `packs`/`packus` do: rounded half to even,
    then saturated; a value beyond int32 (or NaN) converts to INT32_MIN, so to the type's
    minimum even when it is a huge positive one (QLinearAdd/Mul, which clamp only after)."""
    info = np.iinfo(dtype)
    inside = (value > -(2.0**31)) & (value < 2.0**31)
    codes = np.clip(np.rint(np.where(inside, value, 0)), info.min, info.max)
    return np.where(inside, codes, info.min).astype(dtype)


def _scalar_side(a: np.ndarray, b: np.ndarray) -> str | None:
    """Which input ONNX Runtime's broadcast loop feeds as one value per span ("a" or "b"), or
    None when both run as spans. The span is the innermost run of output dims along which
    neither input broadcasts, so an input whose innermost non-unit dim is 1 is the scalar."""
    shape = np.broadcast_shapes(a.shape, b.shape)
    rank = len(shape)
    a_shape = (1,) * (rank - a.ndim) + a.shape
    b_shape = (1,) * (rank - b.ndim) + b.shape
    for axis in reversed(range(rank)):
        if shape[axis] == 1:
            continue
        if a_shape[axis] == 1 and b_shape[axis] != 1:
            return "a"
        if b_shape[axis] == 1 and a_shape[axis] != 1:
            return "b"
        return None
    return None


def qlinear_add(
    a, a_scale, a_zp, b, b_scale, b_zp, c_scale, c_zp, compiled: bool = False
) -> np.ndarray:
    """`MlasQLinearAddKernelAvx2Helper`: the codes themselves (not less their zero points)
    times r_a = s_a/s_c and r_b = s_b/s_c, by FMA onto `fixed = z_c - (r_a z_a + r_b z_b)`:
    `fma(a, r_a, fma(b, r_b, fixed))`, rounded half to even, saturated. GCC contracts the
    scalar `r_a z_a + r_b z_b`, and the broadcast input's multiply-add, into FMAs too: a sweep
    of 150 random cases per form matches ONNX Runtime 1.32 only with every one contracted.
    When A is the input broadcast per span, ONNX Runtime swaps the operands (B, A)."""
    if compiled and channels_last(a, b):  # a pass over the pixels' memory, as it lies
        pixels = (as_pixels(a), a_scale, a_zp, as_pixels(b), b_scale, b_zp, c_scale, c_zp)
        return from_pixels(qlinear_add(*pixels, compiled))
    if _scalar_side(a, b) == "a":
        a, a_scale, a_zp, b, b_scale, b_zp = b, b_scale, b_zp, a, a_scale, a_zp
    r_a, r_b = _f32(a_scale) / _f32(c_scale), _f32(b_scale) / _f32(c_scale)
    fixed = F32(_int(c_zp)) - fma32(r_a, F32(_int(a_zp)), r_b * F32(_int(b_zp)))
    info = np.iinfo(a.dtype)
    if compiled and (rows := spans(a, b)) is not None:  # the same steps, one pass
        out = np.empty(rows[0].shape, a.dtype)
        r_a, r_b, fixed = np.float64(r_a), np.float64(r_b), np.float64(fixed)
        add_spans(*rows, r_a, r_b, fixed, F32(info.min), F32(info.max), out)
        return out.reshape(a.shape)
    return convert_and_pack(fma32(a, r_a, fma32(b, r_b, fixed)), a.dtype)


def qlinear_mul(
    a, a_scale, a_zp, b, b_scale, b_zp, c_scale, c_zp, compiled: bool = False
) -> np.ndarray:
    """`MlasQLinearMulKernel` (SSE2, the kernel x86-64 runs whatever its AVX level): the
    exact integer product of the centred codes, as float32, times `(s_a s_b) / s_c`, plus z_c,
    each step in float32, then rounded half to even and saturated. z_c is added before the
    rounding: in float32 the sum can land on a tie (or leave one) that the product alone
    does not, which moves the code by 1 LSB."""
    if compiled and channels_last(a, b):  # a pass over the pixels' memory, as it lies
        pixels = (as_pixels(a), a_scale, a_zp, as_pixels(b), b_scale, b_zp, c_scale, c_zp)
        return from_pixels(qlinear_mul(*pixels, compiled))
    if a.size < b.size:  # commutes; ONNX Runtime swaps too, and the ratio is symmetric
        a, a_scale, a_zp, b, b_scale, b_zp = b, b_scale, b_zp, a, a_scale, a_zp
    ratio = _f32(a_scale) * _f32(b_scale) / _f32(c_scale)
    info = np.iinfo(a.dtype)
    if compiled and (rows := spans(a, b)) is not None:  # the same steps, one pass
        out = np.empty(rows[0].shape, a.dtype)
        zps = (np.int32(_int(z)) for z in (a_zp, b_zp))
        low, high = F32(info.min), F32(info.max)
        mul_spans(rows[0], next(zps), rows[1], next(zps), ratio, F32(_int(c_zp)), low, high, out)
        return out.reshape(a.shape)
    product = (a.astype(np.int32) - _int(a_zp)) * (b.astype(np.int32) - _int(b_zp))
    return convert_and_pack(product.astype(F32) * ratio + F32(_int(c_zp)), a.dtype)


def global_average_pool(x, x_scale, x_zp, y_scale, y_zp, axes: tuple[int, ...]) -> np.ndarray:
    """`MlasQLinearGlobalAveragePool`: the int32 sum less `z_x * size`, requantized by MLAS
    with the scale `s_x / (s_y * size)` in float32."""
    size = int(np.prod([x.shape[i] for i in axes]))
    acc = x.astype(np.int64).sum(axis=axes, keepdims=True) - _int(x_zp) * size
    scale = _f32(x_scale) / (_f32(y_scale) * F32(size))
    return requantize_mlas(acc, scale, y_zp, x.dtype)


def average_pool(x, x_scale, x_zp, y_scale, y_zp, g: ConvGeometry, count_include_pad: bool):
    """com.microsoft QLinearAveragePool (NCHW, 2-D): each code dequantized in float32, the
    window summed in float32 row by row, divided by the count, then `nearbyint(y / s_y + z_y)`
    in float32. A window covering the whole unpadded image is the global pool's integer path."""
    (kh, kw), (sh, sw) = g.kernel, g.strides
    if (kh, kw) == x.shape[2:] and not any(g.pads):
        return global_average_pool(x, x_scale, x_zp, y_scale, y_zp, (2, 3))
    real = _f32(x_scale) * (x.astype(np.int32) - _int(x_zp)).astype(F32)
    top, left, bottom, right = g.pads
    padded = np.pad(real, ((0, 0), (0, 0), (top, bottom), (left, right)))
    ones = np.pad(np.ones(x.shape[2:], F32), ((top, bottom), (left, right)))
    oh = (x.shape[2] + top + bottom - kh) // sh + 1
    ow = (x.shape[3] + left + right - kw) // sw + 1
    total = np.zeros((*x.shape[:2], oh, ow), F32)
    count = np.zeros((oh, ow), F32)
    for i in range(kh):  # ONNX Runtime's order: h, then w; padding adds +0.0 (no change)
        for j in range(kw):
            rows, cols = slice(i, i + sh * oh, sh), slice(j, j + sw * ow, sw)
            total += padded[:, :, rows, cols]
            count += ones[rows, cols]
    divisor = F32(kh * kw) if count_include_pad else count
    info = np.iinfo(x.dtype)
    codes = np.rint((total / divisor) / _f32(y_scale) + F32(_int(y_zp)))
    return np.clip(codes, info.min, info.max).astype(x.dtype)


def lookup_table(
    x_scale, x_zp, y_scale, y_zp, dtype: np.dtype, function: Callable[[np.ndarray], np.ndarray]
) -> np.ndarray:
    """`QlinearBuildLookupTable`: all 256 codes dequantized in float32 (`s_x * (q - z_x)`),
    mapped by `function` in float32, quantized by `MlasQuantizeLinear` (divide, clamp, round)."""
    codes = np.arange(256, dtype=np.int32).astype(np.uint8).view(dtype).astype(np.int32)
    real = _f32(x_scale) * (codes - _int(x_zp)).astype(F32)
    info = np.iinfo(dtype)
    zp = _int(y_zp)
    scaled = function(real).astype(F32) / _f32(y_scale)
    clamped = np.clip(scaled, F32(info.min - zp), F32(info.max - zp))
    return (np.rint(clamped) + zp).astype(dtype)


def apply_table(x: np.ndarray, table: np.ndarray) -> np.ndarray:
    """Each code replaced by the table's entry at its byte value."""
    return table[x.view(np.uint8)]


def requantize_concat(x, x_scale, x_zp, y_scale, y_zp) -> np.ndarray:
    """QLinearConcat's per-input step: a copy when scale and zero point equal the output's,
    else the identity lookup table."""
    if _f32(x_scale) == _f32(y_scale) and _int(x_zp) == _int(y_zp):
        return x
    return apply_table(x, lookup_table(x_scale, x_zp, y_scale, y_zp, x.dtype, lambda v: v))
