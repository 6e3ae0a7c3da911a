"""quantize / dequantize / fake_quantize: golden tables, properties, ONNX parity."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from qdq import (
    DataError,
    PerBlock,
    PerChannel,
    QParams,
    QScheme,
    Range,
    Rounding,
    choose_qparams,
    dequantize,
    fake_quantize,
    quantize,
)

from onnx_ops import (
    onnx_code_dtype,
    quantize_dequantize_model,
    quantize_linear_model,
    run_ort,
    run_reference,
)

ONNX_SCHEMES = [QScheme(bits=b, signed=s) for b in (2, 4, 8, 16) for s in (True, False)]
ORT_CAN_RETURN = {8, 16}  # ORT hands int4 back as packed Int4x2, which NumPy cannot take
ORT_KNOWS = {4, 8, 16}  # ORT 1.32 rejects int2/uint2 graphs


def _name(scheme: QScheme) -> str:
    return f"{'' if scheme.signed else 'u'}int{scheme.bits}"


def test_onnx_golden_table():
    # ONNX spec example: scale 2, zp 128: 3/2 = 1.5 -> 2 (half to even), 1000/2 + 128 saturates
    p = QParams(2.0, 128, QScheme(signed=False))
    x = np.array([0, 2, 3, 1000, -254, -1000], dtype=np.float32)
    assert quantize(x, p).tolist() == [128, 129, 130, 255, 1, 0]


@pytest.mark.parametrize(
    ("rounding", "expected"),
    [
        (Rounding.HALF_EVEN, [-2, -2, 0, 0, 2, 2, 4]),
        (Rounding.HALF_AWAY, [-3, -2, -1, 1, 2, 3, 4]),
        (Rounding.HALF_UP, [-2, -1, 0, 1, 2, 3, 4]),
    ],
)
def test_rounding_modes_differ_only_on_ties(rounding, expected):
    p = QParams(1.0, 0, QScheme(rounding=rounding))
    x = np.array([-2.5, -1.5, -0.5, 0.5, 1.5, 2.5, 3.7], dtype=np.float32)
    assert quantize(x, p).tolist() == expected


def test_half_away_is_exact_just_below_one_half():
    # the classic trunc(x + 0.5) bug: 0.49999997 + 0.5 rounds up to 1.0 in float32
    p = QParams(1.0, 0, QScheme(rounding=Rounding.HALF_AWAY))
    assert quantize(np.array([0.49999997, -0.49999997], np.float32), p).tolist() == [0, 0]


def _random_qparams(rng, scheme, shape):
    scale = rng.uniform(0.01, 2.0, size=shape).astype(np.float32)
    zero_point = rng.integers(scheme.qmin, scheme.qmax + 1, size=shape)
    return QParams(scale, zero_point, scheme)


def _cases(rng, scheme):
    """(x, qparams, axis, block_size): per tensor, per axis, blocked; ties and saturation."""
    x = rng.standard_normal((3, 8, 5)).astype(np.float32) * 3 * (1 << scheme.bits)
    x.flat[:6] = [0.5, 1.5, -0.5, -2.5, 1e4, -1e4]
    yield x, _random_qparams(rng, scheme, ()), 1, 0
    per_axis = QScheme(scheme.bits, scheme.signed, granularity=PerChannel(1))
    yield x, _random_qparams(rng, per_axis, (8,)), 1, 0
    blocked = QScheme(scheme.bits, scheme.signed, granularity=PerBlock(axis=1, block_size=3))
    yield x, _random_qparams(rng, blocked, (3, 3, 5)), 1, 3


def _onnx_params(p: QParams, scheme: QScheme) -> tuple[np.ndarray, np.ndarray]:
    return p.scale, p.zero_point.astype(np.int32).astype(onnx_code_dtype(scheme))


@pytest.mark.parametrize("scheme", ONNX_SCHEMES, ids=_name)
def test_quantize_matches_onnx_reference(scheme):
    rng = np.random.default_rng(scheme.bits)
    for x, p, axis, block in _cases(rng, scheme):
        scale, zp = _onnx_params(p, scheme)
        expected = run_reference(quantize_linear_model(x, scale, zp, axis, block), {"x": x})
        assert np.array_equal(quantize(x, p).astype(np.int32), expected.astype(np.int32))


@pytest.mark.parametrize("scheme", ONNX_SCHEMES, ids=_name)
def test_dequantize_matches_onnx_reference_and_ort(scheme):
    rng = np.random.default_rng(scheme.bits + 1)
    for x, p, axis, block in _cases(rng, scheme):
        codes = quantize(x, p)
        scale, zp = _onnx_params(p, scheme)
        onnx_codes = codes.astype(np.int32).astype(onnx_code_dtype(scheme))
        model = quantize_linear_model(onnx_codes, scale, zp, axis, block, op="DequantizeLinear")
        assert np.array_equal(dequantize(codes, p), run_reference(model, {}))
        if scheme.bits in ORT_KNOWS:
            assert np.array_equal(dequantize(codes, p), run_ort(model, {}))


@pytest.mark.parametrize("scheme", [s for s in ONNX_SCHEMES if s.bits in ORT_KNOWS], ids=_name)
def test_quantize_matches_onnx_runtime(scheme):
    rng = np.random.default_rng(scheme.bits + 2)
    for x, p, axis, block in _cases(rng, scheme):
        scale, zp = _onnx_params(p, scheme)
        if scheme.bits in ORT_CAN_RETURN:
            got = run_ort(quantize_linear_model(x, scale, zp, axis, block), {"x": x})
            assert np.array_equal(quantize(x, p), got)
        else:
            got = run_ort(quantize_dequantize_model(x, scale, zp, axis, block), {"x": x})
            assert np.array_equal(fake_quantize(x, p), got)


@given(
    x=st.lists(st.floats(-1024.0, 1024.0, width=32), min_size=1, max_size=50),
    scale=st.floats(0.0009765625, 8.0, width=32),
    zp=st.integers(0, 255),
)
def test_fake_quantize_equals_dequantize_of_quantize(x, scale, zp):
    x = np.asarray(x, np.float32)
    p = QParams(scale, zp, QScheme(signed=False))
    assert np.array_equal(fake_quantize(x, p), dequantize(quantize(x, p), p))


@given(seed=st.integers(0, 2**32 - 1), symmetric=st.booleans())
def test_per_channel_equals_per_tensor_on_each_slice(seed, symmetric):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((4, 3, 5)).astype(np.float32) * rng.uniform(0.1, 10, (4, 1, 1))
    per_channel = QScheme(symmetric=symmetric, granularity=PerChannel(0))
    p = choose_qparams(Range(w.min(axis=(1, 2)), w.max(axis=(1, 2))), per_channel)
    codes = quantize(w, p)
    for c in range(4):
        slice_params = choose_qparams(Range(w[c].min(), w[c].max()), QScheme(symmetric=symmetric))
        assert np.array_equal(codes[c], quantize(w[c], slice_params))


def test_values_outside_the_range_saturate():
    p = choose_qparams(Range(-1.0, 1.0), QScheme(bits=4))
    codes = quantize(np.array([-1e30, -np.inf, 1e30, np.inf], np.float32), p)
    assert codes.tolist() == [-8, -8, 7, 7]


def test_int4_codes_convert_to_ml_dtypes_losslessly():
    p = choose_qparams(Range(-1.0, 1.0), QScheme(bits=4))
    codes = quantize(np.linspace(-2, 2, 17, dtype=np.float32), p)
    assert np.array_equal(codes.astype(ml_dtypes.int4).astype(np.int8), codes)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda p: quantize(np.array([1, 2], np.int32), p), "float array"),
        (lambda p: quantize(np.array([1.0, np.nan], np.float32), p), "NaN"),
        (lambda p: dequantize(np.array([1.5]), p), "integer codes"),
        (lambda p: quantize(np.zeros((2, 3), np.float32), _per_channel(5)), r"needs \(2,\)"),
        (lambda p: quantize(np.zeros(3, np.float32), _per_channel(3, axis=2)), "axis 2"),
    ],
)
def test_bad_input_names_the_problem(call, message):
    with pytest.raises(DataError, match=message):
        call(QParams(0.1, 0, QScheme()))


def _per_channel(channels: int, axis: int = 0) -> QParams:
    scheme = QScheme(granularity=PerChannel(axis))
    return QParams(np.ones(channels), np.zeros(channels, np.int64), scheme)
