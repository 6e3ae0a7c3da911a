"""requant="float" is ONNX Runtime's arithmetic: every integer kernel, fed random codes on
scales drawn to land on near ties, gives ONNX Runtime's CPU codes on every element; and the
places where ONNX Runtime departs from the ONNX definition (requant="spec"), each shown by a
minimal case (docs/engine.md, "Requantization"). Whole networks: test_ort_exact_models.py."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

from qdq.engine import mlas, run

MS = "com.microsoft"
RNG = np.random.default_rng(19)


def _ordered(op: str, values: list[tuple[str, np.ndarray, bool]], **attrs):
    """A one-node model whose inputs keep the op's order; the flag marks run-time inputs."""
    names = [n for n, _, _ in values]
    out = helper.np_dtype_to_tensor_dtype(next(v.dtype for _, v, fed in values if fed))
    domain = "" if op in ("QLinearConv", "QLinearMatMul") else MS
    node = helper.make_node(op, names, ["y"], domain=domain, **attrs)
    graph = helper.make_graph(
        [node],
        op,
        [
            helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(v.dtype), v.shape)
            for n, v, fed in values
            if fed
        ],
        [helper.make_tensor_value_info("y", out, None)],
        [numpy_helper.from_array(v, n) for n, v, fed in values if not fed],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(MS, 1)]
    )
    feeds = {n: v for n, v, fed in values if fed}
    return model, feeds


def _agree(model, feeds) -> tuple[np.ndarray, np.ndarray]:
    want = ort.InferenceSession(model.SerializeToString()).run(None, feeds)[0]
    got = run(model, feeds, requant="float")["y"]
    return got, want


def _f32(value: float) -> np.ndarray:
    return np.array(value, np.float32)


def _codes(shape, dtype=np.uint8) -> np.ndarray:
    info = np.iinfo(dtype)
    return RNG.integers(info.min, info.max + 1, shape).astype(dtype)


def _scale() -> np.ndarray:
    return _f32(RNG.uniform(0.001, 0.2))


@pytest.mark.parametrize("b_shape", [(2, 16, 9, 9), (2, 16, 1, 1), (1, 16, 9, 9), (1,)])
@pytest.mark.parametrize("trial", range(4))
def test_qlinear_add_gives_onnx_runtimes_codes(b_shape, trial):
    a, b = _codes((2, 16, 9, 9)), _codes(b_shape)
    for first in (True, False):  # the broadcast input as A, then as B
        x, y = (b, a) if first and b.size < a.size else (a, b)
        model, feeds = _ordered(
            "QLinearAdd",
            [
                ("a", x, True), ("as", _scale(), False), ("az", _codes(()), False),
                ("b", y, True), ("bs", _scale(), False), ("bz", _codes(()), False),
                ("cs", _scale(), False), ("cz", _codes(()), False),
            ],
        )  # fmt: skip
        got, want = _agree(model, feeds)
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("dtype", [np.uint8, np.int8])
@pytest.mark.parametrize("b_shape", [(2, 16, 9, 9), (2, 16, 1, 1)])
def test_qlinear_mul_gives_onnx_runtimes_codes(dtype, b_shape):
    model, feeds = _ordered(
        "QLinearMul",
        [
            ("a", _codes((2, 16, 9, 9), dtype), True), ("as", _scale(), False),
            ("az", _codes((), dtype), False), ("b", _codes(b_shape, dtype), True),
            ("bs", _scale(), False), ("bz", _codes((), dtype), False),
            ("cs", _f32(RNG.uniform(0.5, 4)), False), ("cz", _codes((), dtype), False),
        ],
    )  # fmt: skip
    got, want = _agree(model, feeds)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("size", [7, 14, 49])
def test_qlinear_global_average_pool_gives_onnx_runtimes_codes(size):
    model, feeds = _ordered(
        "QLinearGlobalAveragePool",
        [
            ("x", _codes((4, 32, size, size)), True), ("xs", _scale(), False),
            ("xz", _codes(()), False), ("ys", _scale(), False), ("yz", _codes(()), False),
        ],
    )  # fmt: skip
    got, want = _agree(model, feeds)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("count_include_pad", [0, 1])
@pytest.mark.parametrize(("kernel", "pads", "strides"), [(3, 1, 2), (2, 0, 2), (5, 2, 1)])
def test_qlinear_average_pool_gives_onnx_runtimes_codes(count_include_pad, kernel, pads, strides):
    model, feeds = _ordered(
        "QLinearAveragePool",
        [
            ("x", _codes((2, 8, 11, 11)), True), ("xs", _scale(), False),
            ("xz", _codes(()), False), ("ys", _scale(), False), ("yz", _codes(()), False),
        ],
        kernel_shape=[kernel, kernel], pads=[pads] * 4, strides=[strides] * 2,
        count_include_pad=count_include_pad,
    )  # fmt: skip
    got, want = _agree(model, feeds)
    np.testing.assert_array_equal(got, want)


def test_qlinear_concat_gives_onnx_runtimes_codes():
    ys, yz = _scale(), _codes(())
    model, feeds = _ordered(
        "QLinearConcat",
        [
            ("ys", ys, False), ("yz", yz, False),
            ("a", _codes((2, 3, 5)), True), ("as", _scale(), False), ("az", _codes(()), False),
            ("b", _codes((2, 4, 5)), True), ("bs", ys, False), ("bz", yz, False),  # a copy
        ],
        axis=1,
    )  # fmt: skip
    got, want = _agree(model, feeds)
    np.testing.assert_array_equal(got, want)


def test_qlinear_leaky_relu_gives_onnx_runtimes_codes():
    model, feeds = _ordered(
        "QLinearLeakyRelu",
        [
            ("x", np.arange(256, dtype=np.uint8), True), ("xs", _scale(), False),
            ("xz", _codes(()), False), ("ys", _scale(), False), ("yz", _codes(()), False),
        ],
        alpha=0.1,
    )  # fmt: skip
    got, want = _agree(model, feeds)
    np.testing.assert_array_equal(got, want)


def _conv_case(group: int, stride: int, channels: int = 8, out_channels: int = 8):
    w = RNG.integers(-127, 128, (out_channels, channels // group, 3, 3)).astype(np.int8)
    values = [
        ("x", _codes((2, channels, 9, 9)), True), ("xs", _scale(), False),
        ("xz", _codes(()), False), ("w", w, False),
        ("ws", RNG.uniform(0.001, 0.02, out_channels).astype(np.float32), False),
        ("wz", np.zeros(out_channels, np.int8), False), ("ys", _f32(RNG.uniform(0.5, 2)), False),
        ("yz", _codes(()), False),
        ("b", RNG.integers(-5000, 5000, out_channels).astype(np.int32), False),
    ]  # fmt: skip
    return _ordered("QLinearConv", values, group=group, strides=[stride] * 2, pads=[1] * 4)


@pytest.mark.parametrize("kernels", ["numpy", "compiled"])
@pytest.mark.parametrize(("group", "stride"), [(1, 1), (8, 2), (8, 1), (2, 1)])
@pytest.mark.exact_int8
def test_qlinear_conv_gives_onnx_runtimes_codes(kernels, group, stride):
    """Dense, depthwise (strided and not) and grouped convolutions, per-channel scales."""
    if kernels == "compiled":
        pytest.importorskip("numba")
    model, feeds = _conv_case(group, stride)
    want = ort.InferenceSession(model.SerializeToString()).run(None, feeds)[0]
    np.testing.assert_array_equal(run(model, feeds, requant="float", kernels=kernels)["y"], want)


@pytest.mark.exact_int8
def test_qlinear_matmul_and_qgemm_give_onnx_runtimes_codes():
    a, b = _codes((16, 40)), RNG.integers(-127, 128, (40, 24)).astype(np.int8)
    common = [("a", a, True), ("as", _scale(), False), ("az", _codes(()), False), ("b", b, False)]
    ws = RNG.uniform(0.001, 0.02, 24).astype(np.float32)
    matmul, feeds = _ordered(
        "QLinearMatMul",
        [*common, ("bs", ws, False), ("bz", np.zeros(24, np.int8), False),
         ("ys", _f32(0.7), False), ("yz", _codes(()), False)],
    )  # fmt: skip
    got, want = _agree(matmul, feeds)
    np.testing.assert_array_equal(got, want)
    bias = RNG.integers(-3000, 3000, 24).astype(np.int32)
    gemm, feeds = _ordered(
        "QGemm",
        [*common, ("bs", ws, False), ("bz", np.zeros(24, np.int8), False), ("c", bias, False),
         ("ys", _f32(0.7), False), ("yz", _codes(()), False)],
        alpha=0.75,
    )  # fmt: skip
    got, want = _agree(gemm, feeds)
    np.testing.assert_array_equal(got, want)


# Where the three requantizations part, each on one element (docs/engine.md).


def test_a_near_tie_rounds_as_float32_in_onnx_runtime_and_as_real_in_the_spec():
    # acc = 7 * 143 = 1001, M = float32(20.5 / 1001): the exact product is 20.5000003, which
    # the spec rounds to 21; float32(1001) * M is 20.5 in float32, rounded half to even: 20.
    model, feeds = _ordered(
        "QLinearMatMul",
        [("a", np.full((1, 7), 143, np.uint8), True), ("as", _f32(1), False),
         ("az", np.array(0, np.uint8), False), ("b", np.ones((7, 1), np.int8), False),
         ("bs", np.float32(20.5 / 1001).reshape(()), False), ("bz", np.array(0, np.int8), False),
         ("ys", _f32(1), False), ("yz", np.array(0, np.uint8), False)],
    )  # fmt: skip
    want = ort.InferenceSession(model.SerializeToString()).run(None, feeds)[0]
    assert want[0, 0] == 20
    assert run(model, feeds, requant="float")["y"][0, 0] == 20
    assert run(model, feeds, requant="spec")["y"][0, 0] == 21


def test_fixed_point_rounds_a_tie_away_from_zero():
    # acc = 5, M = 0.5: 2.5 is a tie; gemmlowp rounds it up to 3, float and spec to even, 2.
    model, feeds = _ordered(
        "QLinearMatMul",
        [("a", np.full((1, 5), 1, np.uint8), True), ("as", _f32(1), False),
         ("az", np.array(0, np.uint8), False), ("b", np.ones((5, 1), np.int8), False),
         ("bs", _f32(0.5), False), ("bz", np.array(0, np.int8), False),
         ("ys", _f32(1), False), ("yz", np.array(0, np.uint8), False)],
    )  # fmt: skip
    assert run(model, feeds, requant="fixed")["y"][0, 0] == 3
    assert run(model, feeds, requant="float")["y"][0, 0] == 2
    assert run(model, feeds, requant="spec")["y"][0, 0] == 2


def test_qlinear_add_folds_zero_points_into_a_float32_constant():
    # ((203 - 41) * 0.03096444 + (174 - 241) * 0.09035264) / 0.03516566 = -29.50002: the spec
    # gives round(-29.50002) + 243 = 213; ONNX Runtime's 203 r_a + (174 r_b + fixed) with
    # fixed = 243 - (41 r_a + 241 r_b), each step in float32, lands on -29.5 + 243 -> 214.
    model, feeds = _ordered(
        "QLinearAdd",
        [("a", np.array([203], np.uint8), True), ("as", _f32(0.03096444), False),
         ("az", np.array(41, np.uint8), False), ("b", np.array([174], np.uint8), True),
         ("bs", _f32(0.09035264), False), ("bz", np.array(241, np.uint8), False),
         ("cs", _f32(0.03516566), False), ("cz", np.array(243, np.uint8), False)],
    )  # fmt: skip
    want = ort.InferenceSession(model.SerializeToString()).run(None, feeds)[0]
    assert want[0] == 214
    assert run(model, feeds, requant="float")["y"][0] == 214
    assert run(model, feeds, requant="spec")["y"][0] == 213


def test_qlinear_mul_adds_the_zero_point_before_rounding():
    # (7 - 0) * (1 - 0) * M with M = float32(0.5) less one ulp: 3.4999998, which the spec
    # rounds to 3, plus 128: 131. ONNX Runtime adds z_c = 128 in float32 first, and
    # 131.4999998 is 131.5 in float32, a tie rounded half to even: 132.
    half = np.nextafter(np.float32(0.5), np.float32(0))
    model, feeds = _ordered(
        "QLinearMul",
        [("a", np.array([7], np.uint8), True), ("as", half.reshape(()), False),
         ("az", np.array(0, np.uint8), False), ("b", np.array([1], np.uint8), True),
         ("bs", _f32(1), False), ("bz", np.array(0, np.uint8), False),
         ("cs", _f32(1), False), ("cz", np.array(128, np.uint8), False)],
    )  # fmt: skip
    want = ort.InferenceSession(model.SerializeToString()).run(None, feeds)[0]
    assert want[0] == 132
    for kernels in ("numpy", "compiled"):
        assert run(model, feeds, requant="float", kernels=kernels)["y"][0] == 132
    assert run(model, feeds, requant="spec")["y"][0] == 131


@pytest.mark.parametrize("op", ["QLinearAdd", "QLinearMul"])
@pytest.mark.parametrize("dtype", [np.uint8, np.int8])
def test_a_value_beyond_int32_becomes_the_minimum_in_onnx_runtime(op, dtype):
    # 100 * 3000 / 1e-4 = 3e9 > 2^31: x86's float-to-int32 conversion gives INT32_MIN, which
    # saturates to the type's minimum; the spec saturates to the maximum.
    z = np.array(0, dtype)
    model, feeds = _ordered(
        op,
        [("a", np.array([1, 100], dtype), True), ("as", _f32(3000), False), ("az", z, False),
         ("b", np.array([0, 1], dtype), True), ("bs", _f32(1), False), ("bz", z, False),
         ("cs", _f32(1e-4), False), ("cz", z, False)],
    )  # fmt: skip
    info = np.iinfo(dtype)
    want = ort.InferenceSession(model.SerializeToString()).run(None, feeds)[0]
    assert want[1] == info.min
    np.testing.assert_array_equal(run(model, feeds, requant="float", kernels="numpy")["y"], want)
    np.testing.assert_array_equal(run(model, feeds, requant="float")["y"], want)
    assert run(model, feeds, requant="spec")["y"][1] == info.max


def test_qlinear_sigmoid_tables_mlas_rational_logistic_not_exp():
    # x = 0.05 * (0 - 128) = -6.4: MLAS's rational approximation gives 0.0016588271, the
    # logistic function 0.0016588010. With s_y = float32(0.0016588271 / 127.5) the first is
    # the tie 127.5, rounded to even: 128 (ONNX Runtime); the spec's 127.498 rounds to 127.
    x_scale, y_scale = np.float32(0.05), np.float32(np.float32(0.0016588271) / np.float32(127.5))
    model, feeds = _ordered(
        "QLinearSigmoid",
        [("x", np.array([0], np.uint8), True), ("xs", x_scale.reshape(()), False),
         ("xz", np.array(128, np.uint8), False), ("ys", y_scale.reshape(()), False),
         ("yz", np.array(0, np.uint8), False)],
    )  # fmt: skip
    want = ort.InferenceSession(model.SerializeToString()).run(None, feeds)[0]
    assert want[0] == 128
    zero = np.array(0, np.uint8)
    table = mlas.lookup_table(
        x_scale, np.array(128, np.uint8), y_scale, zero, np.uint8, mlas.logistic
    )
    assert table[0] == 128
    assert run(model, feeds, requant="float")["y"][0] == 128
    assert run(model, feeds, requant="spec")["y"][0] == 127


def test_fma32_rounds_once():
    # 2^-12 (1 + 2^-23) * 2^-12 (1 - 2^-23) + (1 + 2^-23) = 1 + 2^-23 + 2^-24 - 2^-70: float64
    # rounds it onto the float32 midpoint 1 + 2^-23 + 2^-24, which would then round to even
    # (1 + 2^-22); the FMA rounds the exact sum once, down to 1 + 2^-23.
    a = np.float32(2.0**-12 * (1 + 2.0**-23))
    b = np.float32(2.0**-12 * (1 - 2.0**-23))
    c = np.float32(1 + 2.0**-23)
    assert (np.float64(a) * np.float64(b) + np.float64(c)).astype(np.float32) != c
    assert mlas.fma32(a, b, c) == c
