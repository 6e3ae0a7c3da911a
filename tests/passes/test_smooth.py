"""SmoothQuant: outlier channels of a MatMul input moved into its weights, same function."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from qdq.config import QuantConfig
from qdq.data import Samples, model_inputs
from qdq.passes.smooth import smooth
from qdq.pipeline import quantize_model


def outlier_mlp(producer: str) -> onnx.ModelProto:
    """x[N,8,32] -> MatMul -> a float op whose output has 2 channels 50x the rest -> MatMul.

    `producer` "Mul": a constant per-channel gain (as a written-out GELU's last Mul would be);
    "LayerNormalization": the gain is the LayerNorm's own scale (a pre-LN transformer)."""
    rng = np.random.default_rng(0)
    gain = np.ones(64, np.float32)
    gain[[5, 40]] = 50.0
    inits = [
        numpy_helper.from_array(rng.standard_normal((32, 64)).astype(np.float32) * 0.2, "w1"),
        numpy_helper.from_array(rng.standard_normal((64, 16)).astype(np.float32) * 0.2, "w2"),
        numpy_helper.from_array(gain, "gain"),
    ]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1")]
    if producer == "Mul":
        nodes.append(helper.make_node("Mul", ["h", "gain"], ["a"], name="gain"))
    else:
        inits.append(numpy_helper.from_array(np.zeros(64, np.float32), "shift"))
        nodes.append(
            helper.make_node("LayerNormalization", ["h", "gain", "shift"], ["a"], name="ln")
        )
    nodes.append(helper.make_node("MatMul", ["a", "w2"], ["y"], name="fc2"))
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8, 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8, 16])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return onnx.shape_inference.infer_shapes(model)


def run(model: onnx.ModelProto | str, x: np.ndarray) -> np.ndarray:
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else model
    return ort.InferenceSession(source).run(None, {"x": x})[0]


def sqnr_db(want: np.ndarray, got: np.ndarray) -> float:
    return float(10 * np.log10(np.sum(want.astype(np.float64) ** 2) / np.sum((want - got) ** 2)))


@pytest.mark.parametrize("producer", ["Mul", "LayerNormalization"])
def test_smoothing_keeps_the_function_and_divides_where_it_can(tmp_path, producer):
    model = outlier_mlp(producer)
    x = np.random.default_rng(1).standard_normal((64, 8, 32)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    samples = Samples(tmp_path / "x.npy", model_inputs(model))
    before = run(model, x)
    smoothed, chosen = smooth(onnx.ModelProto.FromString(model.SerializeToString()), samples,
                              QuantConfig())  # fmt: skip
    assert list(chosen) == ["a"]
    ops = [n.op_type for n in smoothed.graph.node]
    # a LayerNorm takes the division into its own scale and shift; another op gets a Mul
    assert ops.count("Mul") == (2 if producer == "Mul" else 0)
    np.testing.assert_allclose(
        run(smoothed, x), before, rtol=1e-4, atol=1e-4 * np.abs(before).max()
    )


def test_smoothing_rescues_the_channels_an_outlier_crowds_out(tmp_path):
    model = outlier_mlp("Mul")
    source = tmp_path / "mlp.onnx"
    onnx.save(model, str(source))
    x = np.random.default_rng(2).standard_normal((64, 8, 32)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    sqnr = {}
    for smoothing in (False, True):
        out = tmp_path / f"q_{smoothing}.onnx"
        report = quantize_model(source, out, tmp_path / "x.npy", QuantConfig(smoothing=smoothing))
        sqnr[smoothing] = sqnr_db(run(str(source), x), run(str(out), x))
    assert any("SmoothQuant" in note for note in report.notes)
    fc2 = next(d for d in report.decisions if d.node == "fc2")
    assert fc2.quantized, fc2.reason  # the MatMul after the inserted Mul still runs in int8
    assert sqnr[True] > sqnr[False] + 6
