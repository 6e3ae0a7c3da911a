"""A float16 model, as ONNX Runtime's own converter writes one, quantized as its float32 source
is, its inputs and outputs keeping their types."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from qdq.errors import ModelError
from qdq.passes.widen import widen
from qdq.pipeline import quantize_model

from conftest import DIGITS


def _half(keep_io_types: bool) -> onnx.ModelProto:
    from onnxruntime.transformers.onnx_model import OnnxModel

    model = OnnxModel(onnx.load(str(DIGITS / "cnn.onnx")))
    model.convert_float_to_float16(keep_io_types=keep_io_types)
    return model.model


def _top1(path, x: np.ndarray) -> tuple[np.ndarray, str, str]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    given, made = session.get_inputs()[0], session.get_outputs()[0]
    feed = x.astype(np.float16) if given.type == "tensor(float16)" else x
    return session.run(None, {given.name: feed})[0].argmax(1), given.type, made.type


@pytest.mark.parametrize("keep_io_types", [False, True])
def test_a_float16_cnn_is_quantized_as_its_float32_source(tmp_path, keep_io_types):
    """Its weights had reached each Conv through the Casts ONNX Runtime inserts: 0 of 19 nodes
    quantized, the file larger. With float32 inputs (`keep_io_types`) the converter also
    writes the inputs' Casts after their readers, which ONNX Runtime sorts and qdq refused."""
    source, out = tmp_path / "half.onnx", tmp_path / "int8.onnx"
    onnx.save(_half(keep_io_types), str(source))
    report = quantize_model(source, out, DIGITS / "calib.npz")
    assert all(d.quantized for d in report.decisions if d.op_type in ("Conv", "Gemm"))
    assert any("widened the float16 model" in note for note in report.notes)
    assert report.output_sqnr["logits"] > 35  # checked against the float16 model's outputs
    test = np.load(DIGITS / "test.npz")
    (want, *_), (got, *kept) = (_top1(p, test["input"]) for p in (DIGITS / "cnn.onnx", out))
    assert kept == (["tensor(float)"] * 2 if keep_io_types else ["tensor(float16)"] * 2)
    assert (got == test["label"]).mean() >= (want == test["label"]).mean() - 0.01


def test_a_float32_model_is_left_as_it_is():
    model = onnx.load(str(DIGITS / "cnn.onnx"))
    assert widen(model) == (model, 0)


def test_an_input_returned_as_an_output_stays_float16(tmp_path):
    """Nothing computes it, so nothing widens it, and nothing narrows it back either (the
    widened model had declared it float32; the written one had defined it twice)."""
    model = _half(keep_io_types=False)
    model.graph.output.append(model.graph.input[0])
    source, out = tmp_path / "half.onnx", tmp_path / "int8.onnx"
    onnx.save(model, str(source))
    quantize_model(source, out, DIGITS / "calib.npz")
    x = np.load(DIGITS / "test.npz")["input"][:4].astype(np.float16)
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    logits, echoed = session.run(None, {session.get_inputs()[0].name: x})
    assert echoed.dtype == np.float16
    assert np.array_equal(echoed, x)
    assert logits.dtype == np.float16


def test_a_float16_constant_returned_as_an_output_stays_float16(tmp_path):
    """No node makes it: its Cast back to float16 had read a tensor nothing produced."""
    rng = np.random.default_rng(0)
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("MatMul", ["x", "w"], ["y"])],
        "half_constant_output",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT16, ["N", 8])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT16, ["N", 4]),
         onnx.helper.make_tensor_value_info("c", onnx.TensorProto.FLOAT16, [3])],
        [onnx.numpy_helper.from_array(rng.standard_normal((8, 4)).astype(np.float16), "w"),
         onnx.numpy_helper.from_array(np.array([1, 2, 3], np.float16), "c")],
    )  # fmt: skip
    onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 13)]),
              tmp_path / "m.onnx")  # fmt: skip
    x = rng.standard_normal((16, 8)).astype(np.float16)
    np.save(tmp_path / "x.npy", x)
    quantize_model(tmp_path / "m.onnx", tmp_path / "q.onnx", tmp_path / "x.npy")
    _, c = ort.InferenceSession(str(tmp_path / "q.onnx")).run(None, {"x": x})
    assert c.dtype == np.float16
    assert c.tolist() == [1, 2, 3]


def test_a_float16_model_with_an_if_is_refused_in_one_line(tmp_path):
    """Its branches would stay float16 beside a widened rest: refused with a fix that works
    (it had advised --exclude If, which then ended in an internal error)."""
    half = onnx.TensorProto.FLOAT16
    branch = lambda name: onnx.helper.make_graph(  # noqa: E731 - one line per branch
        [onnx.helper.make_node("Relu", ["x"], [name])], name, [],
        [onnx.helper.make_tensor_value_info(name, half, None)])  # fmt: skip
    branches = {"then_branch": branch("t"), "else_branch": branch("e")}
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("If", ["c"], ["y"], **branches)],
        "half_if",
        [onnx.helper.make_tensor_value_info("x", half, ["N", 4]),
         onnx.helper.make_tensor_value_info("c", onnx.TensorProto.BOOL, [])],
        [onnx.helper.make_tensor_value_info("y", half, ["N", 4])],
    )  # fmt: skip
    onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 13)]),
              tmp_path / "m.onnx")  # fmt: skip
    np.savez(tmp_path / "d.npz", x=np.ones((4, 4), np.float16), c=np.ones(4, bool))
    with pytest.raises(ModelError, match="export the model in float32"):
        quantize_model(tmp_path / "m.onnx", tmp_path / "q.onnx", tmp_path / "d.npz")
