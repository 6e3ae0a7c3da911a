"""Low-bit kernels (qdq.engine.bitops): golden numbers, properties against the int8 kernel, and
the digits models' real layers on every weight grid, checked against ONNX Runtime's
ConvInteger on every element."""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import given
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from qdq.affine import quantize
from qdq.engine.bitops import (
    GRID_KERNELS,
    KERNELS,
    Kernel,
    OpCounts,
    bitplane_matmul,
    conv,
    int8_matmul,
    op_counts,
    shift_add_matmul,
    xnor_matmul,
)
from qdq.errors import DataError
from qdq.lowbit import WeightGrid, grid_codes
from qdq.onnx.conv import ConvGeometry
from qdq.qparams import Range, choose_qparams
from qdq.scheme import INT8_ACTIVATIONS, INT8_WEIGHTS, UINT8_ACTIVATIONS, QScheme

from conftest import DIGITS

LOW_BIT_GRIDS = (WeightGrid.BINARY, WeightGrid.TERNARY, WeightGrid.POWER_OF_TWO)
IMAGES = 16  # test images whose activations feed each layer
ACTIVATION_SCHEMES = {"uint8": UINT8_ACTIVATIONS, "int8": INT8_ACTIVATIONS}
ONNX_DTYPES = {np.dtype(np.uint8): TensorProto.UINT8, np.dtype(np.int8): TensorProto.INT8}


# --- golden -----------------------------------------------------------------------------------


def test_signed_activations_subtract_their_top_bit_plane():
    # int8 x = [-128, 127, -1] (two's complement planes; bit 7 set in -128 and -1), w = [1, 1, -1]:
    # -128 + 127 + 1 = 0; with zero point -128, x - z = [0, 255, 127] -> 0 + 255 - 127 = 128.
    x = np.array([[-128, 127, -1]], np.int8)
    w = np.array([[1, 1, -1]], np.int8)
    assert bitplane_matmul(x, w).tolist() == [[0]]
    assert bitplane_matmul(x, w, -128).tolist() == [[128]]


def test_xnor_ignores_the_pad_bits_of_the_last_byte():
    # K = 9: the second byte holds one real bit and 7 pad bits. x = all +1, w = eight +1 then
    # one -1: 8 - 1 = 7 = 9 - 2 * (one differing bit).
    x = np.ones((1, 9), np.int8)
    w = np.array([[1] * 8 + [-1]], np.int8)
    assert xnor_matmul(x, w).tolist() == [[7]]


def test_shift_add_shifts_each_partial_sum_once():
    # w = [64, -64, 2, 0, -1], x = [1, 2, 3, 200, 5], z = 1:
    # (1 - 2) << 6 + 3 << 1 - 5 = -64 + 6 - 5 = -63; minus z * sum w = 1 * (64 - 64 + 2 - 1) = 1.
    x = np.array([[1, 2, 3, 200, 5]], np.uint8)
    w = np.array([[64, -64, 2, 0, -1]], np.int8)
    assert shift_add_matmul(x, w, 1).tolist() == [[-64]]
    assert int8_matmul(x, w, 1).tolist() == [[-64]]


def test_op_counts_follow_the_formulas():
    # K = 130, M = 2, 64-bit words: 3 per row.
    binary = np.where(np.arange(260).reshape(2, 130) % 3 == 0, -1, 1).astype(np.int8)
    assert op_counts(Kernel.INT8, binary) == OpCounts(130.0, 130.0, 0.0, 0.0, 0.0)
    # XOR, popcount and add per word (3); one shift and one add for K - 2c.
    assert op_counts(Kernel.XNOR, binary) == OpCounts(0.0, 4.0, 1.0, 3.0, 3.0)
    # 8 planes x 3 words ANDs and popcounts; adds 24 + 8 planes + 1 + 130 / 2 row sum = 98.
    assert op_counts(Kernel.BITPLANE, binary) == OpCounts(0.0, 98.0, 8.0, 24.0, 24.0)
    # row 0: 4, 0, -4, 1 (exponents 2, 2, 0: one shifted partial sum) -> 3 + 1 adds, 1 shift;
    # row 1: 2, 8, 0, 0 (exponents 1, 3: two) -> 2 + 2 adds, 2 shifts. Mean: 4 adds, 1.5 shifts.
    pow2 = np.array([[4, 0, -4, 1], [2, 8, 0, 0]], np.int8)
    assert op_counts(Kernel.SHIFT_ADD, pow2) == OpCounts(0.0, 4.0, 1.5, 0.0, 0.0)


def test_ternary_weights_cost_one_add_per_nonzero_weight_and_no_shift():
    ternary = np.array([[1, 0, -1, 0], [0, 0, 0, 1]], np.int8)
    assert op_counts(Kernel.SHIFT_ADD, ternary) == OpCounts(0.0, 1.5, 0.0, 0.0, 0.0)


def test_a_depthwise_patch_sum_is_shared_by_no_other_output():
    # 16 channels of K = 9, group 16: one output per patch, so the patch sum costs 9 adds per
    # output: 8 ANDs and popcounts (one word per plane), 8 + 8 + 1 + 9 = 26 adds.
    w = np.ones((16, 9), np.int8)
    assert op_counts(Kernel.BITPLANE, w, group=16) == OpCounts(0.0, 26.0, 8.0, 8.0, 8.0)
    assert op_counts(Kernel.BITPLANE, w).adds == 17.0 + 9 / 16


# --- properties against the int8 kernel ---------------------------------------------------------


@st.composite
def operands(draw, weights: tuple[int, ...], dtype: type) -> tuple[np.ndarray, np.ndarray, int]:
    """Activation codes x (P, K) of `dtype`, weight codes (M, K) drawn from `weights`, and a
    zero point anywhere in the dtype's range."""
    info = np.iinfo(dtype)
    p, m, k = draw(st.integers(1, 6)), draw(st.integers(1, 5)), draw(st.integers(1, 140))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    x = rng.integers(info.min, info.max, size=(p, k), endpoint=True).astype(dtype)
    w = rng.choice(np.array(weights, np.int8), size=(m, k))
    return x, w, draw(st.integers(int(info.min), int(info.max)))


POW2_CODES = (0, *(s * 2**e for s in (-1, 1) for e in range(7)))


@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16])
@given(data=st.data())
def test_bitplane_equals_int8_kernel(dtype, data):
    x, w, zero_point = data.draw(operands((-1, 1), dtype))
    assert np.array_equal(bitplane_matmul(x, w, zero_point), int8_matmul(x, w, zero_point))


@pytest.mark.parametrize("codes", [(-1, 0, 1), POW2_CODES], ids=["ternary", "power_of_two"])
@pytest.mark.parametrize("dtype", [np.uint8, np.int8])
@given(data=st.data())
def test_shift_add_equals_int8_kernel(codes, dtype, data):
    x, w, zero_point = data.draw(operands(codes, dtype))
    assert np.array_equal(shift_add_matmul(x, w, zero_point), int8_matmul(x, w, zero_point))


@given(data=st.data())
def test_xnor_equals_int8_kernel_on_signs(data):
    x, w, _ = data.draw(operands((-1, 1), np.int8))
    signs = np.where(x >= 0, 1, -1).astype(np.int8)
    assert np.array_equal(xnor_matmul(signs, w), int8_matmul(signs, w))


def test_large_layers_are_taken_in_chunks_with_the_same_result():
    # 3000 rows x 64 outputs x K = 150: 28.8M elements per exponent, past CHUNK_ELEMENTS.
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, size=(3000, 150)).astype(np.uint8)
    w = rng.choice(np.array(POW2_CODES, np.int8), size=(64, 150))
    want = int8_matmul(x, w, 77)
    assert np.array_equal(shift_add_matmul(x, w, 77), want)
    signs = np.where(w >= 0, 1, -1).astype(np.int8)
    assert np.array_equal(bitplane_matmul(x, signs, 77), int8_matmul(x, signs, 77))


# --- the digits models' real layers ------------------------------------------------------------


@dataclass(frozen=True)
class Layer:
    """One Conv of a trained model: its float weight and geometry, the float tensor it reads on
    the test images, and (where it reads a ReLU/Clip) that activation's input, which holds
    negative values and so quantizes to uint8 with a zero point other than 0."""

    name: str
    weight: np.ndarray
    geometry: ConvGeometry
    x: np.ndarray
    before_activation: np.ndarray | None


def _run(model_file: str) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """A bundled FP32 model and every tensor it computes on the first test images."""
    model = onnx.load(str(DIGITS / model_file))
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    del probe.graph.output[:]
    names = [out for node in model.graph.node for out in node.output if node.op_type != "Constant"]
    probe.graph.output.extend(helper.make_empty_tensor_value_info(n) for n in names)
    images = np.load(DIGITS / "test.npz")["input"][:IMAGES]
    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    outputs = session.run(names, {"input": images})
    return model, dict(zip(names, outputs, strict=True)) | {"input": images}


def _layers(model_file: str) -> list[Layer]:
    model, values = _run(model_file)
    producers = {out: node for node in model.graph.node for out in node.output}
    weights = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
    layers = []
    for node in model.graph.node:
        if node.op_type != "Conv":
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        x, w = values[node.input[0]], weights[node.input[1]]
        producer = producers.get(node.input[0])
        before = None
        if producer is not None and producer.op_type in ("Relu", "Clip"):
            before = values[producer.input[0]]
        layers.append(
            Layer(node.name, w, ConvGeometry.from_attributes(attrs, x.shape, w.shape), x, before)
        )
    return layers


@pytest.fixture(scope="module", params=["cnn.onnx", "mobilenet.onnx"])
def layers(request) -> list[Layer]:
    return _layers(request.param)


def _codes(x: np.ndarray, scheme: QScheme) -> tuple[np.ndarray, int]:
    """Activation codes of x on `scheme` (min/max range) and the zero point."""
    qparams = choose_qparams(Range(float(x.min()), float(x.max())), scheme)
    return quantize(x, qparams), int(qparams.zero_point)


def _conv_integer(x: np.ndarray, w: np.ndarray, g: ConvGeometry, zero_point: int) -> np.ndarray:
    """ONNX Runtime's ConvInteger on the same codes: the oracle, padding with the zero point."""
    node = helper.make_node(
        "ConvInteger",
        ["x", "w", "x_zero_point"],
        ["y"],
        kernel_shape=list(g.kernel),
        strides=list(g.strides),
        dilations=list(g.dilations),
        pads=list(g.pads),
        group=g.group,
    )
    graph = helper.make_graph(
        [node],
        "conv_integer",
        [
            helper.make_tensor_value_info("x", ONNX_DTYPES[x.dtype], x.shape),
            helper.make_tensor_value_info("w", TensorProto.INT8, w.shape),
            helper.make_tensor_value_info("x_zero_point", ONNX_DTYPES[x.dtype], []),
        ],
        [helper.make_tensor_value_info("y", TensorProto.INT32, None)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = {"x": x, "w": w, "x_zero_point": np.array(zero_point, x.dtype)}
    return session.run(None, feeds)[0]


@pytest.mark.parametrize("grid", LOW_BIT_GRIDS)
def test_low_bit_convs_equal_int8_and_conv_integer_on_real_layers(layers, grid):
    zero_points = set()
    for layer in layers:
        w, _ = grid_codes(layer.weight, grid, INT8_WEIGHTS)
        feeds = [_codes(layer.x, scheme) for scheme in ACTIVATION_SCHEMES.values()]
        if layer.before_activation is not None:
            feeds.append(_codes(layer.before_activation, UINT8_ACTIVATIONS))
        for x, zero_point in feeds:
            zero_points.add((x.dtype.name, zero_point))
            got = conv(x, w, layer.geometry, GRID_KERNELS[grid], zero_point)
            reference = conv(x, w, layer.geometry, Kernel.INT8, zero_point)
            assert np.array_equal(got, reference), f"{layer.name} {x.dtype} z={zero_point}"
            oracle = _conv_integer(x, w, layer.geometry, zero_point)
            assert np.array_equal(reference, oracle), f"{layer.name} {x.dtype} z={zero_point}"
    # the zero point's constant (L5) was exercised with both signs and in uint8 too
    assert ("int8", -128) in zero_points
    assert any(dtype == "uint8" and z > 0 for dtype, z in zero_points)


def test_xnor_conv_equals_int8_on_binarized_real_layers(layers):
    for layer in layers:
        if layer.before_activation is None or layer.geometry.group != 1:
            continue
        # XNOR-Net binarizes what the activation reads; no padding (1 bit has no 0).
        signs = np.where(layer.before_activation >= 0, 1, -1).astype(np.int8)
        w, _ = grid_codes(layer.weight, WeightGrid.BINARY, INT8_WEIGHTS)
        geometry = replace(layer.geometry, pads=(0, 0, 0, 0))
        got = conv(signs, w, geometry, Kernel.XNOR)
        assert np.array_equal(got, conv(signs, w, geometry, Kernel.INT8)), layer.name
        assert np.array_equal(got, _conv_integer(signs, w, geometry, 0)), layer.name


def test_real_low_bit_layers_need_no_multiplies_and_fewer_adds(layers):
    for layer in layers:
        k = int(np.prod(layer.weight.shape[1:]))
        for grid in LOW_BIT_GRIDS:
            w, _ = grid_codes(layer.weight, grid, INT8_WEIGHTS)
            rows = w.reshape(w.shape[0], -1)
            counts = op_counts(GRID_KERNELS[grid], rows, group=layer.geometry.group)
            assert counts.multiplies == 0
            assert op_counts(Kernel.INT8, rows) == OpCounts(k, k, 0, 0, 0)
            if grid is WeightGrid.TERNARY:  # one add per nonzero weight, nothing else
                assert counts == OpCounts(0, np.count_nonzero(rows) / rows.shape[0], 0, 0, 0)
            if grid is WeightGrid.POWER_OF_TWO:  # each shift goes with one add
                assert counts.adds - counts.shifts <= k


def test_kernels_equal_int8_on_the_trained_classifier():
    model, values = _run("cnn.onnx")
    weights = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
    x, zero_point = _codes(values["/11/Flatten_output_0"], INT8_ACTIVATIONS)  # (16, 64)
    for grid in LOW_BIT_GRIDS:
        w, _ = grid_codes(weights["12.weight"], grid, INT8_WEIGHTS)
        got = KERNELS[GRID_KERNELS[grid]](x, w, zero_point)
        assert np.array_equal(got, int8_matmul(x, w, zero_point)), grid


# --- errors ------------------------------------------------------------------------------------


def test_kernels_refuse_codes_they_cannot_run():
    x = np.array([[1, 2, 3]], np.uint8)
    with pytest.raises(DataError, match=r"\{-1, \+1\}"):
        bitplane_matmul(x, np.array([[1, 0, -1]], np.int8))
    with pytest.raises(DataError, match="0 or \\+-2\\^e, got \\[3\\]"):
        shift_add_matmul(x, np.array([[1, 3, -4]], np.int8))
    with pytest.raises(DataError, match="no zero point"):
        xnor_matmul(np.array([[1, -1, 1]]), np.array([[1, 1, 1]]), 3)
    with pytest.raises(DataError, match="integer codes"):
        int8_matmul(x.astype(np.float32), np.array([[1, 1, 1]], np.int8))
    with pytest.raises(DataError, match=r"x \(P, K\) and w \(M, K\)"):
        int8_matmul(x, np.array([[1, 1]], np.int8))
    with pytest.raises(DataError, match="up to 16 bits"):
        bitplane_matmul(x.astype(np.int32), np.array([[1, 1, 1]], np.int8))


def test_xnor_conv_refuses_padding_and_conv_checks_shapes():
    g = ConvGeometry((1, 1), (1, 1), (1, 1), (1, 1, 1, 1), 1)
    signs = np.ones((1, 2, 3, 3), np.int8)
    with pytest.raises(DataError, match="padding"):
        conv(signs, np.ones((1, 2, 1, 1), np.int8), g, Kernel.XNOR)
    with pytest.raises(DataError, match="group 1"):
        conv(signs, np.ones((1, 3, 1, 1), np.int8), g, Kernel.INT8)


def test_op_counts_refuse_a_weight_that_is_not_rows():
    with pytest.raises(DataError, match=r"\(M, K\)"):
        op_counts(Kernel.INT8, np.ones((2, 3, 3), np.int8))
    with pytest.raises(DataError, match="multiple of group 4"):
        op_counts(Kernel.INT8, np.ones((6, 3), np.int8), group=4)
