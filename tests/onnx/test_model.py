"""Preparing a model with ONNX Runtime's rewrites leaves a graph ONNX Runtime can rewrite again."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper

import models
from qdq.config import QuantConfig
from qdq.onnx.model import OWN_SUFFIX, optimize
from qdq.onnx.opset import default_opset
from qdq.pipeline import quantize_model


def test_initializers_ort_created_are_renamed_so_a_later_session_cannot_recreate_them():
    model = models.attention_block()
    optimized = optimize(model)
    source = {t.name for t in model.graph.initializer}
    created = [t.name for t in optimized.graph.initializer if t.name not in source]
    assert created  # the FFN's MatMul + Add became Gemm between Reshapes
    assert all(name.endswith(OWN_SUFFIX) for name in created)


def test_a_fixed_shape_transformer_block_quantizes_and_loads_in_onnx_runtime(tmp_path):
    """Its int8 attention projections are fused only in the quantized model's session; before,
    that fusion recreated a name the first pass had taken, and every session failed."""
    model_path = tmp_path / "block.onnx"
    model_path.write_bytes(models.attention_block().SerializeToString())
    x = np.random.default_rng(1).standard_normal((32, 1, 8, 16)).astype(np.float32)
    np.save(tmp_path / "x.npy", x.reshape(32, 8, 16))
    out = tmp_path / "q.onnx"
    quantize_model(model_path, out, tmp_path / "x.npy")
    feed = {"x": x[0]}
    want = ort.InferenceSession(str(model_path)).run(None, feed)[0]
    got = ort.InferenceSession(str(out)).run(None, feed)[0]  # default options: all rewrites
    assert np.abs(got - want).max() < 0.1 * np.abs(want).max()


def test_an_opset_9_model_with_its_weights_as_inputs_quantizes_and_runs(tmp_path):
    """Exporters before IR 4 listed weights among the graph inputs, and opset 9 has no
    QuantizeLinear: qdq converts the model to opset 13 and quantizes the weights as constants,
    so the quantized model asks only for the real input."""
    model = models.conv_net(opset=9)
    weights = [v for v in model.graph.input if v.name == "x"] + [
        helper.make_tensor_value_info(t.name, t.data_type, t.dims) for t in model.graph.initializer
    ]
    del model.graph.input[:]
    model.graph.input.extend(weights)
    model.ir_version = 3
    out = _quantized_close(model, (64, 3, 8, 8), 8, tmp_path, seed=2)
    assert [i.name for i in ort.InferenceSession(str(out)).get_inputs()] == ["x"]
    assert default_opset(onnx.load(str(out))) >= 13


def test_an_opset_6_model_whose_conversion_adds_initializers_quantizes(tmp_path):
    """PyTorch's opset-6 exports are IR 3, where every initializer must be a graph input; the
    version converter turns Pad's `pads` attribute into an initializer, and its check refused
    the conversion, so qdq refused a model ONNX Runtime runs."""
    weight = np.random.default_rng(3).standard_normal((4, 3, 3, 3)).astype(np.float32)
    nodes = [
        helper.make_node("Pad", ["x"], ["p"], mode="constant", pads=[0, 0, 1, 1, 0, 0, 1, 1]),
        helper.make_node("Conv", ["p", "w"], ["y"], kernel_shape=[3, 3]),
    ]
    graph = helper.make_graph(
        nodes,
        "old",
        [
            helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 3, 8, 8]),
            helper.make_tensor_value_info("w", onnx.TensorProto.FLOAT, list(weight.shape)),
        ],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 4, 8, 8])],
        [onnx.numpy_helper.from_array(weight, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 6)], ir_version=3)
    out = _quantized_close(model, (32, 3, 8, 8), 1, tmp_path, seed=4)
    assert any(n.op_type == "QuantizeLinear" for n in onnx.load(str(out)).graph.node)


def _quantized_close(
    model: onnx.ModelProto, shape: tuple, fed: int, folder: Path, seed: int
) -> Path:
    """`model` saved and quantized on normal samples of `shape` (`seed`); asserts that the
    written file computes the model's output on the first `fed` within a tenth of its largest
    value."""
    model_path = folder / "old.onnx"
    model_path.write_bytes(model.SerializeToString())
    x = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    np.save(folder / "x.npy", x)
    out = folder / "q.onnx"
    quantize_model(model_path, out, folder / "x.npy")
    want = ort.InferenceSession(str(model_path)).run(None, {"x": x[:fed]})[0]
    got = ort.InferenceSession(str(out)).run(None, {"x": x[:fed]})[0]
    assert np.abs(got - want).max() < 0.1 * np.abs(want).max()
    return out


def test_a_model_with_external_weights_is_sized_with_them(tmp_path):
    """Its .onnx file is the graph alone: the size and the ratio count its weights' file (the
    report had said 0.2 kB -> 22 kB, 90x larger)."""
    source = tmp_path / "m.onnx"
    onnx.save(models.conv_net(), source, save_as_external_data=True, location="m.data",
              size_threshold=0)  # fmt: skip
    calib = tmp_path / "x.npy"
    np.save(calib, np.random.default_rng(0).standard_normal((16, 3, 8, 8)).astype(np.float32))
    report = quantize_model(source, tmp_path / "q.onnx", calib, QuantConfig())
    weights = (tmp_path / "m.data").stat().st_size
    assert report.float_bytes == source.stat().st_size + weights
    assert report.quantized_bytes < report.float_bytes
