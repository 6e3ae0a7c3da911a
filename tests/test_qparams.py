"""choose_qparams: golden numbers, properties and parity with torch.ao."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from qdq import (
    PerChannel,
    QParams,
    QScheme,
    Range,
    RangeError,
    SchemeError,
    choose_qparams,
    dequantize,
    quantize,
)
from qdq.qparams import MIN_SCALE

SCHEMES = [
    QScheme(bits=b, signed=sg, symmetric=sy)
    for b in (2, 4, 8, 16)
    for sg in (True, False)
    for sy in (True, False)
] + [QScheme(symmetric=True, narrow_range=True), QScheme(symmetric=True, power_of_two_scale=True)]


def test_asymmetric_uint8_golden():
    # scale = (3 - -1) / 255 = 0.0156863; zero_point = 0 - round(-1 / 0.0156863) = round(63.75) = 64
    p = choose_qparams(Range(-1.0, 3.0), QScheme(signed=False))
    assert p.scale == np.float32(4 / 255)
    assert p.zero_point == 64
    assert p.zero_point.dtype == np.uint8


def test_symmetric_int8_golden():
    # full range: scale = 2.55 / 127.5 = 0.02; narrow: 2.55 / 127 = 0.0200787
    assert choose_qparams(Range(-1.0, 2.55), QScheme(symmetric=True)).scale == np.float32(0.02)
    narrow = choose_qparams(Range(-1.0, 2.55), QScheme(symmetric=True, narrow_range=True))
    assert narrow.scale == np.float32(2.55 / 127)
    assert narrow.zero_point == 0


def test_symmetric_unsigned_centres_the_zero_point():
    p = choose_qparams(Range(-2.0, 1.0), QScheme(signed=False, symmetric=True))
    assert p.zero_point == 128  # torch.ao's quint8 symmetric convention
    assert p.scale == np.float32(2.0 / 127.5)


def test_power_of_two_scale_rounds_up_to_cover_the_range():
    # 3 / 127.5 = 0.0235 -> 2^-5 = 0.03125
    p = choose_qparams(Range(-3.0, 3.0), QScheme(symmetric=True, power_of_two_scale=True))
    assert p.scale == np.float32(2.0**-5)


@pytest.mark.parametrize("scheme", SCHEMES, ids=str)
@pytest.mark.parametrize("value", [0.0, -0.0])
def test_degenerate_ranges_give_a_valid_scale(scheme, value):
    p = choose_qparams(Range(value, value), scheme)
    assert np.isfinite(p.scale)
    assert p.scale >= np.float32(MIN_SCALE)
    assert dequantize(quantize(np.zeros(3, np.float32), p), p).tolist() == [0.0] * 3


@pytest.mark.parametrize("scheme", SCHEMES, ids=str)
@given(lo=st.floats(-1e6, 1e6), width=st.floats(0, 1e6))
def test_zero_is_exactly_representable(scheme, lo, width):
    p = choose_qparams(Range(lo, lo + width), scheme)
    assert dequantize(quantize(np.zeros(1, np.float32), p), p)[0] == 0.0


@pytest.mark.parametrize("scheme", SCHEMES, ids=str)
@given(lo=st.floats(-1e4, 0), hi=st.floats(0, 1e4))
def test_values_inside_the_range_round_trip_within_half_a_step(scheme, lo, hi):
    p = choose_qparams(Range(lo, hi), scheme)
    x = np.linspace(lo, hi, 101, dtype=np.float32)
    if scheme.symmetric:  # symmetric grids cover [-a, a] with the extra code on one side only
        a = max(-lo, hi) * (1 - 1 / (1 << (scheme.bits - 1)))
        x = np.clip(x, -a, a)
    error = np.abs(dequantize(quantize(x, p), p) - x)
    assert (error <= p.scale / 2 * (1 + 1e-4) + np.abs(x) * 1e-6).all()


def test_symmetric_schemes_have_zero_point_zero():
    for lo, hi in [(-3.0, 1.0), (0.0, 5.0), (-2.0, 0.0)]:
        assert choose_qparams(Range(lo, hi), QScheme(symmetric=True)).zero_point == 0


def test_per_channel_ranges_give_per_channel_qparams():
    scheme = QScheme(symmetric=True, granularity=PerChannel(0))
    p = choose_qparams(Range(np.array([-1.0, -2.0]), np.array([0.5, 4.0])), scheme)
    assert p.scale.tolist() == [np.float32(1 / 127.5), np.float32(4 / 127.5)]


@pytest.mark.parametrize(
    ("lo", "hi", "message"),
    [(np.nan, 1.0, "not finite"), (0.0, np.inf, "not finite"), (2.0, 1.0, "lo > hi")],
)
def test_bad_ranges_are_rejected(lo, hi, message):
    with pytest.raises(RangeError, match=message):
        Range(lo, hi)


def test_hand_written_qparams_are_validated():
    with pytest.raises(SchemeError, match="outside"):
        QParams(0.1, 300, QScheme(signed=False))
    with pytest.raises(SchemeError, match="> 0"):
        QParams(0.0, 0, QScheme())


@pytest.mark.parametrize(
    ("signed", "symmetric"), [(False, False), (True, False), (True, True), (False, True)]
)
def test_parity_with_torch_ao_minmax_qparams(signed, symmetric):
    torch = pytest.importorskip("torch")
    from torch.ao.quantization.observer import MinMaxObserver as TorchMinMax

    dtype = torch.qint8 if signed else torch.quint8
    qscheme = torch.per_tensor_symmetric if symmetric else torch.per_tensor_affine
    rng = np.random.default_rng(0)
    for _ in range(20):
        x = (rng.standard_normal(1000) * rng.uniform(0.01, 10) + rng.uniform(-3, 3)).astype(
            np.float32
        )
        ref = TorchMinMax(dtype=dtype, qscheme=qscheme)
        ref(torch.from_numpy(x))
        scale, zero_point = ref.calculate_qparams()
        p = choose_qparams(Range(x.min(), x.max()), QScheme(signed=signed, symmetric=symmetric))
        assert p.scale == pytest.approx(scale.item(), rel=1e-6)
        assert int(p.zero_point) == zero_point.item()


class _Channels:
    """Per-channel values that fail if anything formats them (their repr is what an error
    message would hold)."""

    def __init__(self, values: np.ndarray) -> None:
        self.values = values

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        return self.values if dtype is None else self.values.astype(dtype)

    def __repr__(self) -> str:
        raise AssertionError("formatted though nothing was wrong")


def test_valid_values_are_never_formatted_into_an_error_message():
    # building the message on every call was 4.4 s of MiniLM's 19 s quantize (docs/ptq.md)
    lo, hi = _Channels(-np.ones(512)), _Channels(np.arange(1.0, 513.0))
    params = choose_qparams(Range(lo, hi), QScheme(signed=False))
    assert params.scale.shape == (512,)
    QParams(_Channels(np.full(512, 0.5)), _Channels(np.zeros(512)), QScheme(signed=False))
