"""Weights kept from saturating ONNX Runtime's u8s8 kernels on x86 without VNNI: the pairs the
kernels add in 16 bits, the scales that keep them within 128 codes, and a quantized model whose
int8 kernels then compute its QDQ arithmetic on every CPU."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import helper

from qdq.plan.saturation import PAIR_CODES, pair_clipped, pair_safe, peak_codes, reduction_rows
from qdq.qparams import QParams
from qdq.scheme import INT8_WEIGHTS, QScheme

from conftest import DIGITS, quantize_cnn

CONV = helper.make_node("Conv", ["x", "w"], ["y"])
DEPTHWISE = helper.make_node("Conv", ["x", "w"], ["y"], group=4)
MULTIPLIER = helper.make_node("Conv", ["x", "w"], ["y"], group=2)  # 2 outputs per input
GEMM_T = helper.make_node("Gemm", ["x", "w"], ["y"], transB=1)
MATMUL = helper.make_node("MatMul", ["x", "w"], ["y"])


def widest_pair(node, codes: np.ndarray) -> int:
    """The most codes of one sign two neighbours of the kernel's sum add to."""
    rows = reduction_rows(node, codes).astype(np.int64)
    pairs = np.pad(rows, ((0, 0), (0, rows.shape[1] % 2))).reshape(rows.shape[0], -1, 2)
    return int(max(np.maximum(pairs, 0).sum(2).max(), np.maximum(-pairs, 0).sum(2).max()))


def test_a_convolution_sums_kernel_rows_then_columns_then_channels_fastest() -> None:
    # ONNX Runtime's QLinearConv (probed, docs/ptq.md): (ic 0, kw 0) pairs with (ic 1, kw 0);
    # with 3 channels (ic 2, kw 0) pairs with (ic 0, kw 1)
    w = np.arange(2 * 3 * 1 * 2).reshape(2, 3, 1, 2)  # (out, in, kh, kw)
    assert reduction_rows(CONV, w)[0].tolist() == [0, 2, 4, 1, 3, 5]


def test_matmul_and_gemm_sum_over_k_and_depthwise_kernels_pair_nothing() -> None:
    k_by_n = np.arange(6).reshape(3, 2)
    assert reduction_rows(MATMUL, k_by_n).tolist() == [[0, 2, 4], [1, 3, 5]]
    assert reduction_rows(GEMM_T, k_by_n.T).tolist() == [[0, 2, 4], [1, 3, 5]]
    assert reduction_rows(DEPTHWISE, np.zeros((4, 1, 3, 3))) is None
    # a channel multiplier runs the GEMM kernel: its taps pair
    assert reduction_rows(MULTIPLIER, np.zeros((4, 1, 3, 3))).shape == (4, 9)


@settings(max_examples=50, deadline=None)
@given(st.integers(0, 2**32 - 1), st.sampled_from([(8, 5, 3, 3), (16, 7, 1, 1), (4, 2, 5, 1)]))
def test_pair_safe_scales_keep_every_pair_of_rounded_codes_within_128(seed, shape) -> None:
    w = np.random.default_rng(seed).standard_t(3, size=shape).astype(np.float32)
    base = QParams(np.abs(w).max(axis=(1, 2, 3)) / 127, np.zeros(shape[0], np.int8), INT8_WEIGHTS)
    safe = pair_safe(base, CONV, w)
    codes = np.clip(np.rint(w / safe.scale[:, None, None, None]), -127, 127)
    assert widest_pair(CONV, codes) <= PAIR_CODES
    assert (safe.scale >= base.scale).all()
    # a channel is only coarsened as far as its widest pair needs
    rows = reduction_rows(CONV, w.astype(np.float64))
    pairs = np.pad(rows, ((0, 0), (0, rows.shape[1] % 2))).reshape(shape[0], -1, 2)
    widest = np.maximum(np.maximum(pairs, 0).sum(2).max(1), np.maximum(-pairs, 0).sum(2).max(1))
    # 255 x (w_k + w_k+1) / s, plus half a code of rounding on each, within int16
    assert np.allclose(safe.scale, np.maximum(base.scale, widest / 127.5), rtol=1e-4)


def test_activations_that_never_reach_255_let_a_channel_keep_a_finer_scale() -> None:
    w = np.zeros((2, 4, 1, 1), np.float32)
    w[:, :2, 0, 0] = 1.0  # (1, 1): a pair of 127s at the 8-bit scale
    base = QParams(np.full(2, 1 / 127), np.zeros(2, np.int8), INT8_WEIGHTS)
    x = QParams(0.1, 0, QScheme(signed=False))
    peak = np.zeros((4, 3, 3), np.float32)
    peak[0], peak[1] = 6.0, 3.0  # codes 60 and 30, doubled for inputs past the samples' peaks
    # 127 x (120 + 60) = 22860 fits int16
    reach = peak_codes(CONV, w, peak, x)
    assert reach.tolist() == [[120, 60, 0, 0]] * 2
    assert pair_safe(base, CONV, w, reach) is base
    peak[1] = 25.5  # code 255 (510, clipped): 127 x 375 does not fit; the scale grows to fit it
    safe = pair_safe(base, CONV, w, peak_codes(CONV, w, peak, x))
    assert safe.scale == pytest.approx(375 / (32767 - 187.5), rel=1e-6)
    codes = np.rint(w[0, :2, 0, 0] / safe.scale[0])
    assert 120 * codes[0] + 255 * codes[1] <= 32767


def test_a_grouped_convolution_reads_each_groups_own_channels() -> None:
    grouped = helper.make_node("Conv", ["x", "w"], ["y"], group=2)
    w = np.zeros((4, 2, 1, 2), np.float32)  # 2 groups of 2 outputs, 2 channels, 2 positions
    peak = np.arange(4, dtype=np.float32).reshape(4, 1, 1)
    reach = peak_codes(grouped, w, peak, QParams(1.0, 0, QScheme(signed=False)))
    # rows: positions outer, the group's channels fastest (codes doubled: headroom)
    assert reach.tolist() == [[0, 2, 0, 2]] * 2 + [[4, 6, 4, 6]] * 2
    gemm = helper.make_node("Gemm", ["x", "w"], ["y"], transB=1)
    x = QParams(1.0, 0, QScheme(signed=False))
    assert peak_codes(gemm, np.zeros((5, 3)), np.array([1.0, 2.0, 3.0]), x).tolist() == [[2, 4, 6]]
    assert peak_codes(gemm, np.zeros((5, 3)), np.array([1.0, 2.0, 3.0]), None) is None


def test_pair_safe_leaves_depthwise_alone_and_coarsens_a_channel_multiplier() -> None:
    w = np.full((4, 1, 3, 3), 1.0, np.float32)
    base = QParams(np.full(4, 1 / 127), np.zeros(4, np.int8), INT8_WEIGHTS)
    assert pair_safe(base, DEPTHWISE, w) is base
    assert pair_safe(base, MULTIPLIER, w).scale[0] == pytest.approx(2 * 255 / (32767 - 255))


def test_pair_clipped_splits_the_excess_between_the_two_codes() -> None:
    codes = np.zeros((2, 3, 1, 2), np.int8)
    codes[0, :, 0, 0] = [127, 100, 120]  # pairs (127, 100) and (120, next: 5)
    codes[0, 0, 0, 1] = 5
    codes[1, 2, 0, 0], codes[1, 0, 0, 1] = -100, -90
    clipped = pair_clipped(CONV, codes)
    assert clipped[0, :, 0, 0].tolist() == [77, 51, 120]  # 99 over: 50 and 49
    assert clipped[0, 0, 0, 1] == 5
    assert (clipped[1, 2, 0, 0], clipped[1, 0, 0, 1]) == (-69, -59)
    assert widest_pair(CONV, clipped) == PAIR_CODES
    # a pair PTQ's codes already held past 128 (safe for the activations it saw) may keep it
    start = codes.copy()
    start[0, 0, 0, 0], start[0, 1, 0, 0] = 127, 60
    assert pair_clipped(CONV, codes, start)[0, :2, 0, 0].tolist() == [107, 80]


def run_both(path: Path, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The model's outputs from its own QDQ arithmetic (no fusion) and from the int8 kernels."""
    out = []
    for level in (
        ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    ):
        options = ort.SessionOptions()
        options.graph_optimization_level = level
        out.append(ort.InferenceSession(str(path), options).run(None, {"input": x})[0])
    return out[0], out[1]


def test_avoided_saturation_makes_int8_kernels_compute_the_files_arithmetic(tmp_path) -> None:
    # Without VNNI the digits CNN's int8 kernels give 13 dB against the file's own 42 dB;
    # with pair-safe weights the two agree on every CPU.
    path, _ = quantize_cnn(tmp_path, prefer="int8", saturation="avoid")
    x = np.load(DIGITS / "test.npz")["input"]
    exact, fused = run_both(path, x)
    noise = np.sum((exact.astype(np.float64) - fused) ** 2)
    assert 10 * np.log10(np.sum(exact.astype(np.float64) ** 2) / noise) > 60
