"""Fixed-point requantization: bit-exact against plain Python integers, 1 LSB from float."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from qdq import DataError
from qdq.fixedpoint import (
    INT32_MAX,
    INT32_MIN,
    RequantRounding,
    multiply_by_quantized_multiplier,
    quantize_multiplier,
    requantize,
    rounding_divide_by_pot,
    saturating_rounding_doubling_high_mul,
)

int32s = st.integers(INT32_MIN, INT32_MAX)


# ---- a reference in Python's unbounded integers, written from gemmlowp's definitions ----


def ref_srdhm(a: int, b: int) -> int:
    if a == b == INT32_MIN:
        return INT32_MAX
    ab = a * b
    nudge = (1 << 30) if ab >= 0 else 1 - (1 << 30)
    total = ab + nudge
    quotient = abs(total) >> 31  # divide, truncating toward zero
    return quotient if total >= 0 else -quotient


def ref_rdbp(x: int, e: int) -> int:
    mask = (1 << e) - 1
    remainder = x & mask
    threshold = (mask >> 1) + (1 if x < 0 else 0)
    return (x >> e) + (1 if remainder > threshold else 0)


def ref_mbqm(x: int, m0: int, shift: int) -> int:
    left, right = max(shift, 0), max(-shift, 0)
    scaled = min(max(x * (1 << left), INT32_MIN), INT32_MAX)
    return ref_rdbp(ref_srdhm(scaled, m0), right)


def ref_mbqm_single(x: int, m0: int, shift: int) -> int:
    total = 31 - min(max(shift, -31), 30)
    return min(max((x * m0 + (1 << (total - 1))) >> total, INT32_MIN), INT32_MAX)


# ---- golden ----


@pytest.mark.parametrize(
    ("real", "m0", "shift"),
    [
        (0.0, 0, 0),
        (0.5, 1 << 30, 0),
        (0.75, 1610612736, 0),
        (1.0, 1 << 30, 1),
        (0.25, 1 << 30, -1),
        # 1 - 2^-33: m0 = round((1 - 2^-33) * 2^31) = 2^31 -> halved to 2^30, shift + 1
        (1 - 2.0**-33, 1 << 30, 1),
        (2.0**-40, 0, 0),  # shift < -31: all bits would shift out
        (2.0**-31, 1 << 30, -30),
    ],
)
def test_quantize_multiplier_golden(real, m0, shift):
    assert tuple(int(v) for v in quantize_multiplier(real)) == (m0, shift)


@given(st.floats(1e-9, 1e4))
def test_quantize_multiplier_reconstructs_the_real_within_2_to_minus_31(real):
    m0, shift = (int(v) for v in quantize_multiplier(real))
    assert (1 << 30) <= m0 < (1 << 31)
    assert abs(m0 * 2.0 ** (shift - 31) - real) <= real * 2.0**-30


def test_quantize_multiplier_rejects_negative_and_nan():
    with pytest.raises(DataError, match=">= 0"):
        quantize_multiplier(-0.5)
    with pytest.raises(DataError, match="finite"):
        quantize_multiplier(float("nan"))


def test_srdhm_saturates_its_single_overflow_case():
    assert saturating_rounding_doubling_high_mul(INT32_MIN, INT32_MIN) == INT32_MAX
    assert saturating_rounding_doubling_high_mul(INT32_MIN, INT32_MAX) == ref_srdhm(
        INT32_MIN, INT32_MAX
    )


def test_rounding_divide_by_pot_rounds_half_away_from_zero():
    x = np.array([5, -5, 6, -6, 7, -7, 3, -3])
    assert rounding_divide_by_pot(x, 1).tolist() == [3, -3, 3, -3, 4, -4, 2, -2]
    assert rounding_divide_by_pot(x, 0).tolist() == x.tolist()


# ---- bit-exact properties ----


@given(a=int32s, b=int32s)
def test_srdhm_is_bit_exact(a, b):
    assert saturating_rounding_doubling_high_mul(a, b) == ref_srdhm(a, b)


@given(x=int32s, e=st.integers(0, 31))
def test_rounding_divide_by_pot_is_bit_exact(x, e):
    assert rounding_divide_by_pot(x, e) == ref_rdbp(x, e)


EDGE_ACCS = [INT32_MIN, INT32_MIN + 1, -1, 0, 1, INT32_MAX - 1, INT32_MAX]
EDGE_REALS = [2.0**-31, 2.0**-40, 1e-9, 0.5, 1 - 2.0**-33, 1.0, 3.0, 1e3]


@given(x=st.one_of(int32s, st.sampled_from(EDGE_ACCS)), real=st.sampled_from(EDGE_REALS))
def test_mbqm_is_bit_exact_on_edges(x, real):
    m0, shift = (int(v) for v in quantize_multiplier(real))
    assert multiply_by_quantized_multiplier(x, m0, shift) == ref_mbqm(x, m0, shift)
    single = multiply_by_quantized_multiplier(x, m0, shift, RequantRounding.SINGLE)
    assert single == ref_mbqm_single(x, m0, shift)


def test_mbqm_vectorized_matches_reference_on_random_inputs():
    rng = np.random.default_rng(0)
    x = rng.integers(INT32_MIN, INT32_MAX, 2000, endpoint=True)
    real = np.exp(rng.uniform(np.log(1e-8), np.log(1.0), 2000))
    m0, shift = quantize_multiplier(real)
    got = multiply_by_quantized_multiplier(x, m0, shift)
    want = [ref_mbqm(int(a), int(m), int(s)) for a, m, s in zip(x, m0, shift, strict=True)]
    assert got.tolist() == want


@given(
    acc=st.lists(st.integers(-(1 << 24), 1 << 24), min_size=1, max_size=64),
    real=st.floats(1e-6, 0.5),
    zero_point=st.integers(-128, 127),
)
def test_requantize_is_within_one_lsb_of_float(acc, real, zero_point):
    acc = np.asarray(acc, dtype=np.int32)
    m0, shift = quantize_multiplier(real)
    fixed = requantize(acc, m0, shift, zero_point, -128, 127)
    exact = np.clip(np.rint(acc * real) + zero_point, -128, 127)
    assert np.abs(fixed - exact).max() <= 1
    single = requantize(acc, m0, shift, zero_point, -128, 127, RequantRounding.SINGLE)
    assert np.abs(single - fixed).max() <= 1


def test_requantize_clamp_is_a_fused_relu():
    m0, shift = quantize_multiplier(0.5)
    assert requantize(np.array([-100, 0, 100]), m0, shift, 0, 0, 127).tolist() == [0, 0, 50]


def test_requantize_per_channel_multipliers_broadcast():
    m0, shift = quantize_multiplier(np.array([0.5, 0.25]))
    acc = np.array([[100, 100], [-100, -100]])
    assert requantize(acc, m0, shift, 0, -128, 127).tolist() == [[50, 25], [-50, -25]]


def test_requantize_rejects_float_and_overflowing_accumulators():
    with pytest.raises(DataError, match="integer accumulator"):
        requantize(np.array([1.0]), 1 << 30, 0, 0, -128, 127)
    with pytest.raises(DataError, match="outside int32"):
        requantize(np.array([1 << 40]), 1 << 30, 0, 0, -128, 127)
