"""Sparse initializers: valid ONNX that ONNX Runtime runs, made dense on load (they had crashed
the engine and the quantized model's check), their external data held to the model's folder
(it had been read from wherever qdq ran) and their untrusted indices checked."""

from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from qdq.engine import Engine
from qdq.errors import ModelError
from qdq.onnx.model import load_model
from qdq.pipeline import quantize_model


def with_sparse_bias(values: onnx.TensorProto, indices: np.ndarray) -> onnx.ModelProto:
    """x[N, 4] -> MatMul W -> Add S, S a sparse [4] initializer."""
    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((4, 4)), "W")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("Add", ["h", "S"], ["y"])],
        "sparse",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
        [numpy_helper.from_array(numpy_helper.to_array(w).astype(np.float32), "W")],
    )
    graph.sparse_initializer.append(
        helper.make_sparse_tensor(values, numpy_helper.from_array(indices, "S_i"), [4])
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_a_sparse_initializer_is_made_dense_and_the_model_quantizes(tmp_path):
    values = numpy_helper.from_array(np.array([1.0, 2.0], np.float32), "S")
    onnx.save(with_sparse_bias(values, np.array([0, 3], np.int64)), tmp_path / "m.onnx")
    model = load_model(tmp_path / "m.onnx")
    dense = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}["S"]
    np.testing.assert_array_equal(dense, [1, 0, 0, 2])
    x = np.random.default_rng(1).standard_normal((32, 4)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    report = quantize_model(tmp_path / "m.onnx", tmp_path / "q.onnx", tmp_path / "x.npy")
    assert report.output_sqnr["y"] > 30
    assert Engine(onnx.load(tmp_path / "q.onnx")).run({"x": x[:2]})["y"].shape == (2, 4)


def test_a_constant_of_a_sparse_value_is_made_dense_and_the_model_quantizes(tmp_path):
    """ONNX Runtime's rewrite had turned it into a sparse initializer of int8 indices, which
    it then refused to load: an internal error."""
    model = with_sparse_bias(numpy_helper.from_array(np.array([1.0], np.float32), "S"),
                             np.array([0], np.int64))  # fmt: skip
    sparse = model.graph.sparse_initializer.pop()
    model.graph.node.insert(0, helper.make_node("Constant", [], ["S"], sparse_value=sparse))
    onnx.save(model, tmp_path / "m.onnx")
    x = np.random.default_rng(1).standard_normal((32, 4)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    report = quantize_model(tmp_path / "m.onnx", tmp_path / "q.onnx", tmp_path / "x.npy")
    assert report.output_sqnr["y"] > 30


def test_sparse_values_outside_the_models_folder_are_refused(tmp_path, monkeypatch):
    """The values name data.bin, which lies in the folder qdq runs in, not the model's."""
    (tmp_path / "model").mkdir()
    (tmp_path / "cwd").mkdir()
    np.array([11, 22, 33, 44], np.float32).tofile(tmp_path / "cwd" / "data.bin")
    values = helper.make_tensor("S", TensorProto.FLOAT, [4], vals=[0, 0, 0, 0])
    values.ClearField("float_data")
    values.data_location = TensorProto.EXTERNAL
    for key, value in (("location", "data.bin"), ("offset", "0"), ("length", "16")):
        values.external_data.add(key=key, value=value)
    model = with_sparse_bias(values, np.arange(4, dtype=np.int64))
    path = tmp_path / "model" / "m.onnx"
    path.write_bytes(model.SerializeToString())
    monkeypatch.chdir(tmp_path / "cwd")
    with pytest.raises(ModelError, match=r"external data file 'data\.bin'"):
        load_model(os.path.relpath(path))
    (tmp_path / "model" / "data.bin").write_bytes((tmp_path / "cwd" / "data.bin").read_bytes())
    loaded = load_model(path)  # beside the model, it is the model's own
    dense = {t.name: numpy_helper.to_array(t) for t in loaded.graph.initializer}["S"]
    np.testing.assert_array_equal(dense, [11, 22, 33, 44])


@pytest.mark.parametrize("indices", [[0, 4], [-1, 2], [[0, 1], [2, 3]]])
def test_sparse_indices_outside_the_shape_are_refused(tmp_path, indices):
    values = numpy_helper.from_array(np.array([1.0, 2.0], np.float32), "S")
    model = with_sparse_bias(values, np.array(indices, np.int64))
    (tmp_path / "m.onnx").write_bytes(model.SerializeToString())
    with pytest.raises(ModelError, match="indices outside its shape"):
        load_model(tmp_path / "m.onnx")
