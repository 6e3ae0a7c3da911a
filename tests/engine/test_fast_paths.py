"""The engine's fast paths against their references: the compiled convolutions (dense, grouped,
depthwise; fused with the requantization) against `integer.exact_conv` and `requantize_mlas`
on real layer shapes with random codes, and the NumPy kernels for integer data movement
(MaxPool, Reshape, Flatten) that replace one-node ONNX Runtime sessions against those, and the
engine's handling of the rest to ONNX Runtime."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

from qdq.engine import Engine, compiled, elementwise, executor, jit, mlas, pixels, vnni
from qdq.engine.code_kernels import flatten, max_pool, reshape
from qdq.engine.context import Context
from qdq.engine.integer import exact_conv, requantize_mlas
from qdq.onnx.conv import ConvGeometry

# without Numba the kernels run as plain Python: correct, far too slow for these shapes
needs_numba = pytest.mark.skipif(not jit.available(), reason="needs Numba (qdq[fast])")

# (N, C, H, W), M, kernel, stride, dilation, pads, group: EfficientNet-Lite0's depthwise and
# pointwise layers, and odd geometries (asymmetric pads, dilation, grouped, past the image)
LAYERS = [
    ((2, 32, 112, 112), 32, 3, 1, 1, (1, 1, 1, 1), 32),
    ((2, 96, 112, 112), 96, 3, 2, 1, (0, 0, 1, 1), 96),
    ((2, 144, 56, 56), 144, 5, 2, 1, (1, 1, 2, 2), 144),
    ((2, 672, 14, 14), 672, 5, 1, 1, (2, 2, 2, 2), 672),
    ((2, 1152, 7, 7), 1152, 3, 1, 1, (1, 1, 1, 1), 1152),
    ((3, 8, 9, 11), 8, 3, 2, 2, (2, 0, 1, 3), 8),
    ((2, 16, 56, 56), 96, 1, 1, 1, (0, 0, 0, 0), 1),
    ((2, 1152, 7, 7), 192, 1, 1, 1, (0, 0, 0, 0), 1),
    ((2, 3, 30, 30), 16, 3, 2, 1, (1, 1, 1, 1), 1),
    ((3, 12, 10, 13), 8, 3, 1, 2, (0, 3, 2, 1), 4),
    ((1, 4, 6, 6), 6, 2, 3, 1, (0, 0, 4, 5), 2),
]


def _case(shape, m, k, group, dtype, seed):
    rng = np.random.default_rng(seed)
    info = np.iinfo(dtype)
    x = rng.integers(info.min, info.max + 1, shape, dtype=dtype)
    x_zp = int(rng.integers(info.min, info.max + 1))
    w = rng.integers(-127, 128, (m, shape[1] // group, k, k))
    return x, x_zp, w


def _channels_last(x: np.ndarray) -> np.ndarray:
    """x with the same values, its memory channels-last, as the compiled convolutions write."""
    return pixels.from_pixels(np.ascontiguousarray(pixels.as_pixels(x)))


@needs_numba
@pytest.mark.parametrize("layer", LAYERS, ids=lambda layer: "x".join(map(str, layer[0][1:])))
@pytest.mark.parametrize("dtype", [np.uint8, np.int8])
@pytest.mark.parametrize("path", ["nchw", "channels_last", "float32_products", "wide_weights"])
def test_compiled_convolution_gives_the_exact_sums_and_mlas_codes(layer, dtype, path, monkeypatch):
    """Either memory layout in; dense products in int8 (VNNI, where the CPU has it) or in
    float32 BLAS (asked for, or because centred weights pass int8, as uint8 weights with a
    zero point can)."""
    shape, m, k, stride, dilation, pads, group = layer
    x, x_zp, w = _case(shape, m, k, group, dtype, seed=len(shape) * m + k)
    w = w * 2 if path == "wide_weights" else w
    x = x if path == "nchw" else _channels_last(x)
    if path == "float32_products":
        monkeypatch.setattr(compiled, "INT8_PRODUCTS", False)
    g = ConvGeometry((k, k), (stride, stride), (dilation, dilation), pads, group)
    want = exact_conv(x.astype(np.int64) - x_zp, w, g)
    depthwise = w.shape[1] == 1 and group == m == shape[1]
    weights = w[:, 0].transpose(1, 2, 0) if depthwise else w.reshape(m, -1)
    weights = np.ascontiguousarray(weights, np.float32)
    acc = compiled.conv_accumulator(x, x_zp, weights, g, w[0].size)
    np.testing.assert_array_equal(acc.reshape(want.shape), want)

    rng = np.random.default_rng(m)
    bias = rng.integers(-(2**15), 2**15, m).astype(np.int32)
    scale = (rng.uniform(0.5, 2, m) / np.abs(want).max()).astype(np.float32) * 127
    y_zp = np.array(int(rng.integers(-20, 20)) % 256 - (128 if dtype == np.int8 else 0), dtype)
    limits = np.iinfo(dtype)
    low, high = np.float32(limits.min - int(y_zp)), np.float32(limits.max - int(y_zp))
    fused = (bias, scale, int(y_zp), low, high, dtype)
    codes = compiled.conv_accumulator(x, x_zp, weights, g, w[0].size, fused)
    reference = requantize_mlas(
        want + bias.reshape(1, -1, 1, 1), scale.reshape(1, -1, 1, 1), y_zp, dtype
    )
    assert codes.dtype == dtype
    np.testing.assert_array_equal(codes.reshape(reference.shape), reference)


@needs_numba
def test_chunked_sums_are_exact_past_float32():
    """K terms whose partial sums pass 2^24: float32 products over chunks, added in float64."""
    rng = np.random.default_rng(3)
    x = rng.integers(0, 256, (2, 1152, 7, 7), dtype=np.uint8)
    w = np.full((64, 1152, 1, 1), 127)
    w[::2] *= -1
    g = ConvGeometry((1, 1), (1, 1), (1, 1), (0, 0, 0, 0), 1)
    want = exact_conv(x.astype(np.int64), w, g)
    assert np.abs(want).max() >= 2**24
    chunk = (2**24 - 1) // (255 * 127)
    weights = w.reshape(64, -1).astype(np.float32)
    acc = compiled.conv_accumulator(x, 0, weights, g, chunk)
    np.testing.assert_array_equal(acc.reshape(want.shape), want)


@pytest.mark.skipif(not vnni.available(), reason="needs Numba and an AVX-512 VNNI CPU")
def test_int8_products_are_exact_where_partial_sums_wrap():
    """vpdpbusd's int32 lanes wrap: past 2^31 halfway through the terms, back to the exact
    sum by the end, as MLAS's do."""
    k, m = 140_000, 32
    a = np.full((vnni.ROWS, k), 255, np.uint8)
    a[1] = np.arange(k) % 256
    w = np.full((k, m), 127, np.int8)
    w[k // 2 :] = -127
    w[:, 1] = np.random.default_rng(2).integers(-128, 128, k)
    packed, sums = vnni.pack_weights(w)
    np.testing.assert_array_equal(sums, w.astype(np.int64).sum(axis=0))
    out = np.empty((vnni.ROWS, m), np.int32)
    vnni.gemm(a.ravel(), vnni.ROWS, k, packed, m, out.ravel())
    want = a.astype(np.int64) @ w.astype(np.int64)
    assert np.abs(want).max() < 2**31 < 255 * 127 * k // 2  # partial sums wrapped
    np.testing.assert_array_equal(out, want)


def test_weights_past_int8_are_not_packed():
    assert vnni.pack_weights(np.array([[127, -128]])) is not None
    assert vnni.pack_weights(np.array([[128, 0]])) is None


@needs_numba
@pytest.mark.parametrize("op", [mlas.qlinear_add, mlas.qlinear_mul])
def test_elementwise_kernels_read_channels_last_memory_as_it_lies(op):
    rng = np.random.default_rng(7)
    a, b = (rng.integers(0, 256, (2, 16, 9, 9), dtype=np.uint8) for _ in range(2))
    (s_a, s_b, s_c), (z_a, z_b, z_c) = rng.uniform(0.01, 0.2, 3), rng.integers(0, 256, 3)
    f32, u8 = np.float32, np.uint8
    grids = (f32(s_a), u8(z_a), f32(s_b), u8(z_b), f32(s_c), u8(z_c))

    def apply(a, b):
        return op(a, grids[0], grids[1], b, grids[2], grids[3], grids[4], grids[5], True)

    laid = _channels_last(a), _channels_last(b)
    assert pixels.channels_last(*laid)
    got = apply(*laid)
    np.testing.assert_array_equal(got, apply(a, b))
    assert pixels.as_pixels(got).flags.c_contiguous  # written as it was read


def _ort_node(op: str, inputs: dict[str, np.ndarray], **attrs) -> np.ndarray:
    """`op` run alone by ONNX Runtime on `inputs`, one thread."""
    node = helper.make_node(op, list(inputs), ["y"], **attrs)
    graph = helper.make_graph(
        [node],
        "one",
        [
            helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(x.dtype), None)
            for n, x in inputs.items()
        ],
        [onnx.ValueInfoProto(name="y")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), options)
    return session.run(None, inputs)[0]


@needs_numba
@pytest.mark.parametrize("memory", ["nchw", "channels_last"])
def test_compiled_elementwise_ops_are_onnx_runtimes(memory):
    """Per-tensor QuantizeLinear (x / s on ties) and DequantizeLinear, and the float ops the
    compiled path runs in place of one-node sessions, bit for bit, laid out as their input."""
    rng = np.random.default_rng(11)
    shape = (2, 16, 9, 7)
    scale, zero = np.array(0.0173, np.float32), np.array(131, np.uint8)
    ties = (rng.integers(-300, 300, shape) + 0.5).astype(np.float32) * scale
    a, b = rng.standard_normal(shape).astype(np.float32) * 4, rng.standard_normal(shape)
    a, b, ties = (_channels_last(t) if memory == "channels_last" else t for t in (a, b, ties))
    b = b.astype(np.float32)
    codes = elementwise.quantize(ties, scale, zero)
    cases = [
        (codes, _ort_node("QuantizeLinear", {"x": ties, "s": scale, "z": zero})),
        (
            elementwise.dequantize(codes, scale, zero),
            _ort_node("DequantizeLinear", {"x": codes, "s": scale, "z": zero}),
        ),
        (elementwise.binary("Add", a, b), _ort_node("Add", {"a": a, "b": b})),
        (elementwise.binary("Mul", a, b), _ort_node("Mul", {"a": a, "b": b})),
        (elementwise.binary("Mul", a, np.float32(3)), a * np.float32(3)),
        (
            elementwise.hard_sigmoid(a, 1 / 6, 0.5),
            _ort_node("HardSigmoid", {"x": a}, alpha=1 / 6, beta=0.5),
        ),
    ]
    for got, want in cases:
        assert pixels.as_pixels(got).flags.c_contiguous == (memory == "channels_last")
        np.testing.assert_array_equal(got, want)
    assert elementwise.binary("Add", a, b[:, :1]) is None  # broadcasting: ONNX Runtime's


@pytest.mark.parametrize(
    "attrs",
    [
        {"kernel_shape": [2, 2], "strides": [2, 2]},
        {"kernel_shape": [3, 3], "strides": [1, 1], "pads": [1, 1, 1, 1]},
        {"kernel_shape": [3, 2], "strides": [2, 1], "pads": [0, 1, 2, 0], "dilations": [2, 1]},
        {"kernel_shape": [3, 3], "strides": [2, 2], "auto_pad": "SAME_UPPER"},
    ],
)
@pytest.mark.parametrize("dtype", [np.uint8, np.int8])
@pytest.mark.parametrize("path", ["numpy", "compiled", "compiled_channels_last"])
def test_integer_max_pool_is_onnx_runtimes(attrs, dtype, path):
    if path != "numpy" and not jit.available():
        pytest.skip("needs Numba (qdq[fast])")
    info = np.iinfo(dtype)
    x = np.random.default_rng(5).integers(info.min, info.max + 1, (3, 5, 11, 9), dtype=dtype)
    want = _ort_node("MaxPool", {"x": x}, **attrs)
    context = Context(compiled=path != "numpy")
    x = _channels_last(x) if path == "compiled_channels_last" else x
    np.testing.assert_array_equal(max_pool(context, [x], attrs)[0], want)
    assert max_pool(context, [x], attrs | {"ceil_mode": 1}) is None  # left to ONNX Runtime


@pytest.mark.parametrize(
    "shape", [[0, -1], [2, 0, 3, -1], [-1], [6, 5, 11, 3]], ids=lambda s: ",".join(map(str, s))
)
def test_integer_reshape_is_onnx_runtimes(shape):
    x = np.arange(2 * 5 * 11 * 9, dtype=np.int64).astype(np.int8).reshape(2, 5, 11, 9)
    target = np.array(shape, np.int64)
    got = reshape(Context(), [x, target], {})[0]
    np.testing.assert_array_equal(got, _ort_node("Reshape", {"x": x, "shape": target}))


@pytest.mark.parametrize("axis", [0, 1, 3, 4, -1, -4])
def test_integer_flatten_is_onnx_runtimes(axis):
    x = np.arange(2 * 5 * 11 * 9, dtype=np.int64).astype(np.uint8).reshape(2, 5, 11, 9)
    got = flatten(Context(), [x], {"axis": axis})[0]
    np.testing.assert_array_equal(got, _ort_node("Flatten", {"x": x}, axis=axis))


def _one_node_model(op: str, dtype: np.dtype, **attrs) -> onnx.ModelProto:
    node = helper.make_node(op, ["x"], ["y"], **attrs)
    tensor_type = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    graph = helper.make_graph(
        [node],
        "one",
        [helper.make_tensor_value_info("x", tensor_type, None)],
        [helper.make_tensor_value_info("y", tensor_type, None)],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_a_form_the_integer_kernel_declines_runs_in_onnx_runtime():
    model = _one_node_model("MaxPool", np.uint8, kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1)
    x = np.random.default_rng(2).integers(0, 256, (2, 3, 8, 8), dtype=np.uint8)
    engine = Engine(model, threads=1)
    np.testing.assert_array_equal(engine.run({"x": x})["y"], _ort_node_model(model, x))
    assert [position for position, _ in engine._sessions] == [0]  # ONNX Runtime ran it
    assert engine.float_nodes == []


def test_the_float_fallback_runs_on_the_threads_asked_for():
    model = _one_node_model("Sigmoid", np.float32)
    x = np.random.default_rng(3).standard_normal((4, 100)).astype(np.float32)
    engine = Engine(model, threads=1)
    np.testing.assert_array_equal(engine.run({"x": x})["y"], _ort_node_model(model, x))
    assert [n.endswith("(Sigmoid)") for n in engine.float_nodes] == [True]
    (session,) = engine._sessions.values()
    assert session.get_session_options().intra_op_num_threads == 1


def _ort_node_model(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    return ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})[0]


@pytest.mark.parametrize("shaped", [True, False])
def test_a_float_pool_sums_in_the_order_of_onnx_runtimes_whole_graph(shaped, monkeypatch):
    """ONNX Runtime's layout transformer runs a pool whose channel count it knows in NCHWc,
    which sums in another order than its plain kernel: the engine's one-node session of the
    pool declares the input's shape, so that it gets the same kernel (without: half differ)."""
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("AveragePool", ["c"], ["y"], kernel_shape=[3, 2], strides=[3, 2]),
    ]
    weights = numpy_helper.from_array(rng.standard_normal((32, 16, 3, 3)).astype(np.float32), "w")
    graph = helper.make_graph(
        nodes,
        "pool",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [None, 16, 12, 12])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
        [weights],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    x = rng.standard_normal((2, 16, 12, 12)).astype(np.float32)
    want = _ort_node_model(model, x)
    if not shaped:
        monkeypatch.setattr(executor, "SHAPED", frozenset())
    same = np.mean(Engine(model, "float", threads=1).run({"x": x})["y"] == want)
    assert same == 1.0 if shaped else same < 0.9
