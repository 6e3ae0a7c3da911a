"""Low-bit weight grids (docs/quantization.md, §16-§18): golden numbers, properties, and the
digits CNN quantized on each grid and run in ONNX Runtime."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from onnx import numpy_helper

from qdq import PerChannel, PerTensor, QScheme, SchemeError, WeightGrid, grid_codes
from qdq.config import QuantConfig, preset_config
from qdq.errors import DataError
from qdq.lowbit import (
    binarize,
    power_of_two_codes,
    power_of_two_scales,
    snap_to_power_of_two,
    ternarize,
    ternary_threshold,
)
from qdq.pipeline import quantize_model
from qdq.qparams import MIN_SCALE
from qdq.scheme import INT4_WEIGHTS, INT8_WEIGHTS

from conftest import DIGITS

GRID_CODES = {
    WeightGrid.BINARY: {-1, 1},
    WeightGrid.TERNARY: {-1, 0, 1},
    WeightGrid.POWER_OF_TWO: {0, *(s * 2**k for s in (-1, 1) for k in range(7))},
}

rows = hnp.arrays(
    np.float64,
    st.tuples(st.integers(1, 4), st.integers(1, 40)),
    elements=st.floats(-100, 100, allow_nan=False, allow_subnormal=False, width=32),
)


# golden: hand-checkable numbers


def test_binary_codes_are_the_sign_and_the_scale_is_the_mean_magnitude():
    # row 0: |w| = 0.5, 1.5, 0.25, 1.75 -> mean 4 / 4 = 1.0; row 1: mean 0.4 / 4 = 0.1, sign(0) = +1
    w = np.array([[0.5, -1.5, 0.25, -1.75], [0.0, -0.1, 0.1, -0.2]])
    codes, scale = binarize(w, power_of_two_scale=False)
    assert codes.tolist() == [[1, -1, 1, -1], [1, -1, 1, -1]]
    np.testing.assert_allclose(scale, [1.0, 0.1], rtol=1e-7)


def test_ternary_threshold_is_0_7_of_the_mean_magnitude_and_scale_the_mean_above_it():
    # mean|w| = (1.0 + 0.2 + 0.1 + 0.7) / 4 = 0.5, delta = 0.35: 1.0 and -0.7 are kept,
    # scale (1.0 + 0.7) / 2 = 0.85
    w = np.array([[1.0, -0.2, 0.1, -0.7]])
    np.testing.assert_allclose(ternary_threshold(w), [0.35])
    codes, scale = ternarize(w, power_of_two_scale=False)
    assert codes.tolist() == [[1, 0, 0, -1]]
    np.testing.assert_allclose(scale, [0.85], rtol=1e-7)


def test_power_of_two_snaps_to_the_nearest_level_ties_away_from_zero():
    # midpoints 0.5, 1.5, 3, 6, ..., 48 between 0, 1, 2, 4, ..., 64; beyond 64 saturates
    x = np.array([0.4, 0.5, 1.4, 1.5, -5.0, 47.9, 48.0, 100.0])
    assert snap_to_power_of_two(x, bits=8).tolist() == [0, 1, 1, 2, -4, 32, 64, 64]
    assert snap_to_power_of_two(x, bits=4).tolist() == [0, 1, 1, 2, -4, 4, 4, 4]


def test_power_of_two_keeps_the_scale_that_maps_the_largest_weight_to_64():
    # scale 1/64: 1.0 -> 64, 0.3 -> 19.2 -> 16 (0.25), -0.1 -> -6.4 -> -8 (-0.125);
    # squared error 0.05^2 + 0.025^2 = 0.003125, the least of every candidate
    codes, scale = power_of_two_codes(np.array([[1.0, 0.3, -0.1]]), 8, power_of_two_scale=False)
    assert codes.tolist() == [[64, 16, -8]]
    assert scale.tolist() == [1 / 64]


def test_power_of_two_scale_candidates_span_two_octaves():
    # max|w| = 6.4 -> 6.4 / 64 = 0.1 down to 0.025; as powers of two: 2^-3, 2^-4, 2^-5
    free = power_of_two_scales(np.array([6.4]), 8, power_of_two_scale=False)
    assert free.shape == (33, 1)
    np.testing.assert_allclose(free[[0, 16, 32], 0], [0.1, 0.05, 0.025])
    assert power_of_two_scales(np.array([6.4]), 8, True)[:, 0].tolist() == [1 / 8, 1 / 16, 1 / 32]


def test_grid_codes_follow_the_schemes_axis_and_storage():
    w = np.arange(24, dtype=np.float32).reshape(2, 3, 4) - 11.5
    codes, scale = grid_codes(
        w, WeightGrid.TERNARY, replace(INT8_WEIGHTS, granularity=PerChannel(1))
    )
    assert codes.shape == w.shape
    assert codes.dtype == np.int8
    assert scale.shape == (3,)
    codes, scale = grid_codes(w, WeightGrid.BINARY, replace(INT8_WEIGHTS, granularity=PerTensor()))
    assert scale.shape == ()
    assert float(scale) == pytest.approx(np.abs(w).mean())


def test_a_dead_channel_gets_zero_codes_and_the_smallest_scale():
    w = np.zeros((2, 3), np.float32)
    w[1] = [1.0, -2.0, 4.0]
    codes, scale = grid_codes(w, WeightGrid.POWER_OF_TWO, INT8_WEIGHTS)
    assert codes[0].tolist() == [0, 0, 0]
    assert scale[0] == MIN_SCALE


@pytest.mark.parametrize(
    ("grid", "scheme", "fix"),
    [
        (WeightGrid.UNIFORM, INT8_WEIGHTS, "qdq.affine.quantize"),
        (WeightGrid.BINARY, QScheme(), "signed symmetric"),
        (WeightGrid.TERNARY, QScheme(symmetric=True, signed=False), "signed symmetric"),
    ],
)
def test_grids_refuse_what_they_cannot_store(grid, scheme, fix):
    with pytest.raises(SchemeError, match=fix):
        grid_codes(np.ones((2, 2), np.float32), grid, scheme)


def test_grids_refuse_nan_weights():
    with pytest.raises(DataError, match="NaN"):
        grid_codes(np.array([[np.nan, 1.0]]), WeightGrid.BINARY, INT8_WEIGHTS)


def test_config_refuses_adaround_and_asymmetric_weights_on_a_low_bit_grid():
    with pytest.raises(SchemeError, match="AdaRound"):
        QuantConfig(weight_grid="binary", adaround=True)
    with pytest.raises(SchemeError, match="signed symmetric"):
        QuantConfig(weight_grid="ternary", weights=QScheme(granularity=PerChannel(0)))
    with pytest.raises(SchemeError, match="choose one of uniform, binary"):
        preset_config("default", weight_grid="octal")
    assert preset_config("default", weight_grid="ternary").weight_grid is WeightGrid.TERNARY


# properties


@given(rows, st.booleans())
def test_binary_reconstruction_is_the_sign_times_the_mean_magnitude(w, pow2):
    codes, scale = binarize(w, pow2)
    assert set(np.unique(codes)) <= {-1, 1}
    assert (codes == np.where(w >= 0, 1, -1)).all()
    mean = np.maximum(np.abs(w).mean(axis=1), MIN_SCALE)
    if pow2:  # the power of two nearest the mean: within a factor 4/3 of it (§16)
        assert (np.log2(scale) == np.round(np.log2(scale))).all()
        assert (scale <= mean * 4 / 3 * (1 + 1e-6)).all()
        assert (scale >= mean * 2 / 3).all()
    else:
        np.testing.assert_allclose(scale, mean, rtol=1e-6)


@given(rows)
def test_ternary_codes_are_zero_exactly_at_or_below_the_threshold(w):
    codes, scale = ternarize(w, power_of_two_scale=False)
    delta = ternary_threshold(w)[:, None]
    assert set(np.unique(codes)) <= {-1, 0, 1}
    assert ((codes == 0) == (np.abs(w) <= delta)).all()
    assert (codes[codes != 0] == np.sign(w[codes != 0])).all()
    kept = np.abs(w) > delta
    for row, mask, s in zip(w, kept, scale, strict=True):
        if mask.any():
            assert s == pytest.approx(max(np.abs(row[mask]).mean(), MIN_SCALE), rel=1e-6)


@given(rows, st.booleans(), st.sampled_from([3, 4, 8]))
def test_power_of_two_values_are_zero_or_powers_of_two_and_the_scale_is_the_best_candidate(
    w, pow2, bits
):
    codes, scale = power_of_two_codes(w, bits, pow2)
    magnitudes = np.abs(codes[codes != 0])
    assert (magnitudes & (magnitudes - 1) == 0).all()
    assert magnitudes.max(initial=1) <= 2 ** (bits - 2)
    if pow2:  # every dequantized value is exactly 0 or +-2^k
        values = np.abs(codes * scale[:, None].astype(np.float64))
        assert (np.log2(values[values > 0]) % 1 == 0).all()
    chosen = np.square(codes * scale[:, None].astype(np.float64) - w).sum(axis=1)
    for s in power_of_two_scales(np.abs(w).max(axis=1), bits, pow2):
        other = snap_to_power_of_two(w / s[:, None], bits) * s[:, None]
        # the search runs in float64, the kept scale is float32 (what the file stores)
        assert (chosen <= np.square(other - w).sum(axis=1) * (1 + 1e-5) + 1e-12).all()


@given(rows, st.sampled_from([WeightGrid.BINARY, WeightGrid.TERNARY, WeightGrid.POWER_OF_TWO]))
def test_per_channel_codes_equal_per_tensor_codes_on_each_slice(w, grid):
    codes, scale = grid_codes(w, grid, INT8_WEIGHTS)
    for c in range(w.shape[0]):
        one, s = grid_codes(w[c : c + 1], grid, replace(INT8_WEIGHTS, granularity=PerTensor()))
        assert (one[0] == codes[c]).all()
        assert s == scale[c]


# the digits CNN on each grid, in ONNX Runtime


def _accuracy(path: Path) -> float:
    with np.load(DIGITS / "test.npz") as test:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        logits = session.run(None, {"input": test["input"]})[0]
        return float((logits.argmax(axis=1) == test["label"]).mean())


def _weight_codes_and_scales(path: Path) -> tuple[set[int], list[np.ndarray]]:
    model = onnx.load(str(path))
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    codes: set[int] = set()
    scales = []
    for node in model.graph.node:
        q = inits.get(node.input[0]) if node.op_type == "DequantizeLinear" else None
        if q is not None and q.dtype == np.int8 and q.ndim > 1:
            codes.update(int(c) for c in np.unique(q))
            scales.append(inits[node.input[1]])
    return codes, scales


@pytest.mark.parametrize(
    ("grid", "floor"),
    # measured (bench/lowbit.py): FP32 99.63%, binary 70.56%, ternary 96.85%, power-of-two 98.52%
    [(WeightGrid.BINARY, 0.65), (WeightGrid.TERNARY, 0.94), (WeightGrid.POWER_OF_TWO, 0.97)],
)
def test_the_digits_cnn_runs_in_onnx_runtime_on_each_grid(tmp_path, grid, floor):
    out = tmp_path / "cnn.onnx"
    quantize_model(DIGITS / "cnn.onnx", out, DIGITS / "calib.npz", QuantConfig(weight_grid=grid))
    codes, scales = _weight_codes_and_scales(out)
    assert codes <= GRID_CODES[grid]
    assert len(scales) >= 2
    assert all(s.ndim == 1 for s in scales)  # per channel
    assert _accuracy(out) >= floor


@pytest.mark.parametrize("grid", [WeightGrid.UNIFORM, WeightGrid.POWER_OF_TWO])
def test_power_of_two_scales_work_for_weights_in_ptq(tmp_path, grid):
    out = tmp_path / "cnn.onnx"
    config = QuantConfig(weights=replace(INT8_WEIGHTS, power_of_two_scale=True), weight_grid=grid)
    quantize_model(DIGITS / "cnn.onnx", out, DIGITS / "calib.npz", config)
    _, scales = _weight_codes_and_scales(out)
    for s in scales:  # dynamic fixed point: every weight scale is 2^-f
        assert (np.log2(s) == np.round(np.log2(s))).all()
    assert _accuracy(out) >= 0.985  # measured 99.63% (uniform), 99.26% (power of two)


def test_four_bit_power_of_two_weights_use_three_exponents(tmp_path):
    out = tmp_path / "cnn.onnx"
    config = QuantConfig(weights=INT4_WEIGHTS, weight_grid="power_of_two")
    quantize_model(DIGITS / "cnn.onnx", out, DIGITS / "calib.npz", config)
    assert _weight_codes_and_scales(out)[0] <= {0, -1, 1, -2, 2, -4, 4}


def test_the_cli_takes_a_weight_grid(tmp_path):
    out = tmp_path / "cnn.onnx"
    done = subprocess.run(
        [sys.executable, "-m", "qdq.cli", "quantize", str(DIGITS / "cnn.onnx"), "-o", str(out),
         "--calib", str(DIGITS / "calib.npz"), "--weight-grid", "ternary"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert _weight_codes_and_scales(out)[0] <= {-1, 0, 1}


def test_a_grid_named_by_a_string_is_that_grid_and_an_unknown_name_is_refused():
    """Compared with `is`, "binary" had matched nothing and given power-of-two codes."""
    w = np.array([[0.5, -0.6], [0.55, -0.55]], np.float32)
    scheme = QScheme(8, signed=True, symmetric=True, granularity=PerTensor())
    by_name, by_enum = grid_codes(w, "binary", scheme), grid_codes(w, WeightGrid.BINARY, scheme)
    np.testing.assert_array_equal(by_name[0], by_enum[0])
    np.testing.assert_array_equal(by_name[1], by_enum[1])
    with pytest.raises(SchemeError, match="unknown weight grid"):
        grid_codes(w, "foo", scheme)


def test_exclude_given_as_one_string_is_refused():
    with pytest.raises(SchemeError, match="a tuple of names"):
        QuantConfig(exclude="Conv")


def test_a_matmul_whose_constant_comes_first_stays_float_under_low_bit_weights(tmp_path):
    """MatMul(W, x): the rules quantize its A as an activation, on 8 bits, while the file
    recorded the binary grid asked for; it stays float, saying why."""
    rng = np.random.default_rng(0)
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("MatMul", ["w", "x"], ["y"], name="mm")],
        "a_first",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [8, 4])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [6, 4])],
        [numpy_helper.from_array(rng.standard_normal((6, 8)).astype(np.float32), "w")],
    )
    onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)]),
              tmp_path / "m.onnx")  # fmt: skip
    np.save(tmp_path / "x.npy", rng.standard_normal((16, 8, 4)).astype(np.float32))
    config = QuantConfig(weight_grid=WeightGrid.BINARY)
    report = quantize_model(tmp_path / "m.onnx", tmp_path / "q.onnx", tmp_path / "x.npy", config)
    [decision] = report.decisions
    assert not decision.quantized
    assert "second operand" in decision.reason


@pytest.mark.parametrize("grid", [WeightGrid.UNIFORM, WeightGrid.TERNARY])
def test_a_layer_whose_weight_holds_nan_stays_float(tmp_path, grid):
    """Its output is NaN in FP32 too: the layer is kept float, saying why (the uniform grid had
    ended the quantize blaming the calibration data, the low-bit ones the model)."""
    weight = np.array([[1, np.nan, 0, 1], [1, 2, 3, 4]], np.float32)
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Gemm", ["x", "w"], ["y"], name="fc", transB=1)],
        "nan_weight",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [None, 4])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [None, 2])],
        [numpy_helper.from_array(weight, "w")],
    )
    onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)]),
              tmp_path / "m.onnx")  # fmt: skip
    np.save(tmp_path / "x.npy", np.random.default_rng(0).standard_normal((8, 4)).astype(np.float32))
    config = QuantConfig(weight_grid=grid)
    report = quantize_model(tmp_path / "m.onnx", tmp_path / "q.onnx", tmp_path / "x.npy", config)
    [decision] = report.decisions
    assert (decision.quantized, decision.reason) == (False, "weight 'w' holds NaN or Inf")
