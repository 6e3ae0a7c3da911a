"""The integer engine: ONNX's conformance cases, parity with ONNX Runtime on whole models,
fixed-point against float requantization, and the accumulator simulation."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, numpy_helper
from onnx.backend.test.case.node import collect_testcases

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
        got = run(case.model, feeds, requant="float")
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


def _output_lsb(model: onnx.ModelProto) -> float:
    """How far one integer step moves the model's output: the scale of the DequantizeLinear
    that produces it, or, where the last Gemm outputs float (QGemm, DQ -> Gemm), one step of its
    input times its largest weight (a bound)."""
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    last = producer[model.graph.output[0].name]
    if last.op_type == "DequantizeLinear":
        return float(inits[last.input[1]])
    if last.op_type == "QGemm":  # A, a_scale, a_zero_point, B, b_scale, b_zero_point, C
        a_scale, codes, b_scale = (inits[name] for name in np.array(last.input)[[1, 3, 4]])
    else:  # Gemm reading two DequantizeLinear outputs
        x, w = (producer[name] for name in last.input[:2])
        a_scale, codes, b_scale = inits[x.input[1]], inits[w.input[0]], inits[w.input[1]]
    return float(a_scale * np.abs(codes.astype(np.float64)).max() * b_scale.max())


@pytest.mark.slow
@pytest.mark.parametrize(
    "key", ["cnn_qdq", "cnn_qoperator", "mobilenet_qdq", "mobilenet_qoperator"]
)
def test_float_requant_matches_onnx_runtime_on_whole_models(digits_models, key):
    path = digits_models[key]
    x = np.load(DIGITS / "test.npz")["input"]
    want = ort.InferenceSession(str(path)).run(None, {"input": x})[0]
    engine = Engine(path, requant="float")
    got = engine.run({"input": x})["logits"]
    lsb = _output_lsb(onnx.load(str(path)))
    steps = np.abs(got.astype(np.float64) - want) / lsb
    assert np.mean(steps < 1e-3) >= 0.99  # identical on at least 99% of elements
    # The rest: ties that ONNX Runtime's float32 requantization and the engine's float64 round
    # apart, one code each, a few cascading (mobilenet: 7 of the last layer's 34560 input codes
    # 1 apart, 4.2 steps at most).
    assert steps.max() <= 8
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
    quantize_model(DIGITS / "transformer.onnx", out, DIGITS / "calib.npz")
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
