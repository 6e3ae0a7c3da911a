"""The integer engine: ONNX's conformance cases, parity with ONNX Runtime on whole models,
fixed-point against float requantization, and the accumulator simulation."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, numpy_helper
from onnx.backend.test.case.node import collect_testcases

from qdq.config import preset_config
from qdq.engine import Engine, run
from qdq.pipeline import quantize_model

from conftest import DIGITS

OPS = {
    "QuantizeLinear",
    "DequantizeLinear",
    "DynamicQuantizeLinear",
    "QLinearConv",
    "QLinearMatMul",
    "ConvInteger",
    "MatMulInteger",
}

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # the collector's own float casts warn
    CASES = [c for c in collect_testcases() if {n.op_type for n in c.model.graph.node} & OPS]


def _array(value: np.ndarray | TensorProto) -> np.ndarray:
    return numpy_helper.to_array(value) if isinstance(value, TensorProto) else value


def test_every_conformance_case_is_collected():
    assert len(CASES) == 45


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_onnx_conformance_case_passes(case):
    for inputs, outputs in case.data_sets:
        feeds = {i.name: _array(x) for i, x in zip(case.model.graph.input, inputs, strict=True)}
        got = run(case.model, feeds, requant="spec")
        for info, want in zip(case.model.graph.output, map(_array, outputs), strict=True):
            assert got[info.name].dtype == want.dtype
            np.testing.assert_array_equal(
                got[info.name].astype(np.float64), want.astype(np.float64)
            )


@pytest.mark.parametrize(
    "case",
    [c for c in CASES if c.model.graph.node[0].op_type in ("QLinearConv", "QLinearMatMul")],
    ids=lambda c: c.name,
)
def test_fixed_point_requantization_is_within_one_lsb_of_float(case):
    inputs, _ = case.data_sets[0]
    feeds = {i.name: _array(x) for i, x in zip(case.model.graph.input, inputs, strict=True)}
    fixed = run(case.model, feeds, requant="fixed")
    exact = run(case.model, feeds, requant="float")
    for name in fixed:
        diff = np.abs(fixed[name].astype(np.int64) - exact[name].astype(np.int64))
        assert diff.max() <= 1


@pytest.fixture(scope="module")
def digits_models(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("engine")
    models = {}
    for name in ("cnn", "mobilenet"):
        for fmt in ("qdq", "qoperator"):
            out = folder / f"{name}_{fmt}.onnx"
            quantize_model(DIGITS / f"{name}.onnx", out, DIGITS / "calib.npz", output_format=fmt)
            models[f"{name}_{fmt}"] = out
    return models


@pytest.mark.slow
@pytest.mark.parametrize(
    "key", ["cnn_qdq", "cnn_qoperator", "mobilenet_qdq", "mobilenet_qoperator"]
)
@pytest.mark.exact_int8
def test_float_requant_matches_onnx_runtime_on_whole_models(digits_models, key):
    path = digits_models[key]
    x = np.load(DIGITS / "test.npz")["input"]
    want = ort.InferenceSession(str(path)).run(None, {"input": x})[0]
    engine = Engine(path, requant="float")
    got = engine.run({"input": x})["logits"]
    # requant="float" is ONNX Runtime's own float32 arithmetic (MLAS): bit-identical
    np.testing.assert_array_equal(got, want)
    assert engine.float_nodes == []  # int8 from input to output


@pytest.mark.slow
@pytest.mark.parametrize("key", ["cnn_qoperator", "mobilenet_qoperator"])
def test_fixed_point_model_keeps_the_predictions(digits_models, key):
    path = digits_models[key]
    x = np.load(DIGITS / "test.npz")["input"]
    fixed = run(path, {"input": x}, requant="fixed")["logits"]
    exact = run(path, {"input": x}, requant="float")["logits"]
    # Integer-only requantization moves some int8 codes by 1 LSB; the float logits that the last
    # Gemm computes from them stay within 1% of the logits' spread, and so do the predictions.
    assert np.median(np.abs(fixed - exact)) <= 0.01 * np.std(exact)
    assert np.mean(fixed.argmax(axis=1) == exact.argmax(axis=1)) >= 0.99


@pytest.mark.slow
def test_a_16_bit_accumulator_overflows_where_32_bits_do_not(digits_models):
    x = np.load(DIGITS / "test.npz")["input"]
    narrow = Engine(digits_models["cnn_qoperator"], accumulator_bits=16)
    wide = Engine(digits_models["cnn_qoperator"], accumulator_bits=32)
    narrow.run({"input": x})
    wide.run({"input": x})
    assert sum(o.overflows for o in narrow.overflows()) > 0
    assert sum(o.overflows for o in wide.overflows()) == 0
    assert {o.node for o in narrow.overflows()} == {o.node for o in wide.overflows()}


@pytest.mark.slow
def test_float_ops_are_fallbacks_and_float_output_matmuls_integer(tmp_path):
    out = tmp_path / "t.onnx"
    # every op the rules allow: the default's timed candidates keep the first and last layers
    # float when the machine is busy
    config = preset_config("default", prefer="int8")
    quantize_model(DIGITS / "transformer.onnx", out, DIGITS / "calib.npz", config)
    engine = Engine(out, requant="float")
    x = np.load(DIGITS / "test.npz")["input"][:16]
    got = engine.run({"input": x})["logits"]
    assert any("LayerNormalization" in n for n in engine.float_nodes)
    # the int8 MatMuls with float outputs (MatMulIntegerToFloat) run on integer kernels
    assert not any("MatMul" in n or "Gemm" in n for n in engine.float_nodes)
    want = ort.InferenceSession(str(out)).run(None, {"input": x})[0]
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3 * np.abs(want).max())


def test_missing_feeds_name_the_inputs():
    with pytest.raises(ValueError, match="'input'"):
        run(DIGITS / "cnn.onnx", {"x": np.zeros((1, 1, 8, 8), np.float32)})


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="requant"):
        Engine(DIGITS / "cnn.onnx", requant="exact")
    with pytest.raises(ValueError, match="kernels"):
        Engine(DIGITS / "cnn.onnx", kernels="gpu")
    with pytest.raises(ValueError, match="accumulator_bits"):
        Engine(DIGITS / "cnn.onnx", accumulator_bits=24)


@pytest.mark.parametrize("count_include_pad", [0, 1])
def test_qlinear_average_pool_matches_onnx_runtime(count_include_pad):
    from onnx import helper

    node = helper.make_node(
        "QLinearAveragePool",
        ["x", "xs", "xz", "ys", "yz"],
        ["y"],
        domain="com.microsoft",
        kernel_shape=[3, 3],
        pads=[1, 1, 1, 1],
        strides=[2, 2],
        count_include_pad=count_include_pad,
    )
    inits = [
        numpy_helper.from_array(np.array(0.05, np.float32), "xs"),
        numpy_helper.from_array(np.array(7, np.uint8), "xz"),
        numpy_helper.from_array(np.array(0.04, np.float32), "ys"),
        numpy_helper.from_array(np.array(3, np.uint8), "yz"),
    ]
    graph = helper.make_graph(
        [node],
        "pool",
        [helper.make_tensor_value_info("x", TensorProto.UINT8, None)],
        [helper.make_tensor_value_info("y", TensorProto.UINT8, None)],
        inits,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    )
    x = np.random.default_rng(0).integers(0, 256, (2, 3, 9, 9), dtype=np.uint8)
    want = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})[0]
    got = run(model, {"x": x})["y"]
    assert np.abs(got.astype(int) - want.astype(int)).max() <= 1
    assert np.mean(got == want) >= 0.95  # ORT rounds in float32; ties differ by 1 LSB


def test_a_float_fallback_node_may_read_one_tensor_twice():
    """ONNX Runtime's optimizer merges equal constants, so a Slice's axes and steps can be one
    tensor (all-MiniLM-L6-v2's QOperator model has such a Slice)."""
    from onnx import helper

    one = numpy_helper.from_array(np.array([1], np.int64), "one")
    bounds = [numpy_helper.from_array(np.array([v], np.int64), n) for n, v in (("s", 2), ("e", 6))]
    graph = helper.make_graph(
        [helper.make_node("Slice", ["x", "s", "e", "one", "one"], ["y"], name="slice")],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 4])],
        [one, *bounds],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    x = np.arange(24, dtype=np.float32).reshape(3, 8)
    np.testing.assert_array_equal(run(model, {"x": x})["y"], x[:, 2:6])


def _integer_op(op: str, a: np.ndarray, b: np.ndarray):
    """A one-node MatMulInteger / ConvInteger model: `a` fed, `b` constant, zero points 0."""
    from onnx import helper

    graph = helper.make_graph(
        [helper.make_node(op, ["a", "b"], ["y"])],
        op,
        [helper.make_tensor_value_info("a", TensorProto.UINT8, a.shape)],
        [helper.make_tensor_value_info("y", TensorProto.INT32, None)],
        [numpy_helper.from_array(b, "b")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_a_16_bit_datapath_saturates_each_pair_of_products():
    # 255 * 127 = 32385 per product; vpmaddubsw adds pairs: 64770 saturates to 32767 and
    # -64770 to -32768, so the sum is -1, where the exact sum (0) fits int16 and a clamp of
    # the final sum alone would give 0.
    a = np.full((1, 4), 255, np.uint8)
    b = np.array([[127], [127], [-127], [-127]], np.int8)
    model = _integer_op("MatMulInteger", a, b)
    narrow = Engine(model, accumulator_bits=16)
    assert narrow.run({"a": a})["y"][0, 0] == -1
    assert [(o.overflows, o.total) for o in narrow.overflows()] == [(1, 1)]
    assert run(model, {"a": a}, accumulator_bits=32)["y"][0, 0] == 0


def test_a_16_bit_convolution_pairs_channels_at_one_tap():
    # K runs tap-major, channel-minor (MLAS's filter layout): channels 0 and 1 at a tap form a
    # pair, 2 and 3 the next; the same -1 as above at every pixel of a 1x1 convolution.
    x = np.full((1, 4, 3, 3), 255, np.uint8)
    w = np.array([127, 127, -127, -127], np.int8).reshape(1, 4, 1, 1)
    got = run(_integer_op("ConvInteger", x, w), {"a": x}, accumulator_bits=16)["y"]
    np.testing.assert_array_equal(got, np.full((1, 1, 3, 3), -1))
    # the pairs (255 * 127) + (255 * -127) = 0 when the channels interleave: no saturation
    w = np.array([127, -127, 127, -127], np.int8).reshape(1, 4, 1, 1)
    got = run(_integer_op("ConvInteger", x, w), {"a": x}, accumulator_bits=16)["y"]
    np.testing.assert_array_equal(got, np.zeros((1, 1, 3, 3)))
