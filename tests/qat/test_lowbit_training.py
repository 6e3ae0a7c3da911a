"""qdq.qat.lowbit: binary, ternary and power-of-two weights in training equal the NumPy
reference (qdq.lowbit) bit for bit, with straight-through gradients."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import onnx
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from onnx import numpy_helper

from qdq.errors import SchemeError
from qdq.lowbit import WeightGrid, grid_codes
from qdq.qat.lowbit import (
    LowBitWeight,
    binarize,
    power_of_two_codes,
    snap_to_power_of_two,
    ternarize,
)
from qdq.scheme import INT4_WEIGHTS, INT8_WEIGHTS, PerChannel, PerTensor, QScheme

from conftest import DIGITS

GRIDS = [WeightGrid.BINARY, WeightGrid.TERNARY, WeightGrid.POWER_OF_TWO]


def rows(values: list[float]) -> torch.Tensor:
    return torch.tensor([values], dtype=torch.float64)


def test_binary_golden_row():
    # mean |w| = (0.5 + 1.5 + 0.25 + 1.75) / 4 = 1.0
    codes, scale = binarize(rows([0.5, -1.5, 0.25, -1.75]), power_of_two_scale=False)
    assert codes.tolist() == [[1, -1, 1, -1]]
    assert scale.tolist() == [1.0]


def test_ternary_golden_row():
    # mean |w| = 0.5, delta = 0.35: keeps 1.0 and -0.7, scale (1.0 + 0.7) / 2 = 0.85
    codes, scale = ternarize(rows([1.0, -0.2, 0.1, -0.7]), power_of_two_scale=False)
    assert codes.tolist() == [[1, 0, 0, -1]]
    assert scale.item() == pytest.approx(0.85)


def test_power_of_two_golden_row():
    # scale 1/64: 1.0 -> 64, 0.3 * 64 = 19.2 -> 16, -0.1 * 64 = -6.4 -> -8
    codes, scale = power_of_two_codes(rows([1.0, 0.3, -0.1]), bits=8, power_of_two_scale=False)
    assert codes.tolist() == [[64, 16, -8]]
    assert scale.item() == 1 / 64


def test_snap_ties_go_away_from_zero():
    x = torch.tensor([0.4, 0.5, 1.4, 1.5, -5, 47.9, 48, 100], dtype=torch.float64)
    assert snap_to_power_of_two(x, 8).tolist() == [0, 1, 1, 2, -4, 32, 64, 64]


schemes = st.sampled_from(
    [
        INT8_WEIGHTS,
        INT4_WEIGHTS,
        replace(INT8_WEIGHTS, granularity=PerTensor()),
        replace(INT8_WEIGHTS, power_of_two_scale=True),
        replace(INT4_WEIGHTS, granularity=PerChannel(1), power_of_two_scale=True),
    ]
)


@given(
    grid=st.sampled_from(GRIDS),
    scheme=schemes,
    shape=st.sampled_from([(4, 3), (8, 2, 3, 3), (3, 1, 3, 3), (5, 7)]),
    seed=st.integers(0, 2**16),
    spread=st.floats(1e-3, 10.0),
)
def test_forward_equals_numpy_reference(grid, scheme, shape, seed, spread):
    w = np.random.default_rng(seed).normal(0, spread, shape).astype(np.float32)
    codes, scale = grid_codes(w, grid, scheme)
    axis = scheme.granularity.axis if isinstance(scheme.granularity, PerChannel) else None
    expected = codes.astype(np.float32) * (scale if axis is None else _along(scale, axis, w.ndim))
    got = LowBitWeight(grid, scheme)(torch.from_numpy(w))
    np.testing.assert_array_equal(got.detach().numpy(), expected)


@pytest.mark.parametrize("grid", GRIDS)
def test_real_conv_weights_match_the_reference(grid):
    """Every weight of the bundled digits CNN, per output channel."""
    model = onnx.load(str(DIGITS / "cnn.onnx"))
    for tensor in model.graph.initializer:
        w = numpy_helper.to_array(tensor)
        if w.ndim < 2:
            continue
        codes, scale = grid_codes(w, grid, INT8_WEIGHTS)
        got_codes, got_scale = LowBitWeight(grid, INT8_WEIGHTS).codes_and_scale(torch.tensor(w))
        np.testing.assert_array_equal(got_codes.numpy(), codes)
        np.testing.assert_array_equal(got_scale.numpy(), scale)


@pytest.mark.parametrize("grid", GRIDS)
def test_gradient_passes_straight_through(grid):
    w = torch.randn(6, 4, 3, 3, requires_grad=True)
    upstream = torch.randn(6, 4, 3, 3)
    LowBitWeight(grid, INT8_WEIGHTS)(w).backward(upstream)
    assert torch.equal(w.grad, upstream)


def test_uniform_or_asymmetric_grids_are_refused():
    with pytest.raises(SchemeError, match="uniform"):
        LowBitWeight("uniform", INT8_WEIGHTS)
    with pytest.raises(SchemeError, match="zero point 0"):
        LowBitWeight("binary", QScheme(bits=8, signed=False, granularity=PerChannel(0)))


def _along(scale: np.ndarray, axis: int, ndim: int) -> np.ndarray:
    shape = [1] * ndim
    shape[axis] = -1
    return scale.reshape(shape)
