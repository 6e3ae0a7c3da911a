"""Sparse initializers made dense: every pass reads dense constants, and a sparse one had
crashed the engine and the quantized model's check (ONNX's checker and ONNX Runtime accept
them). Their values and indices are checked like any other tensor of an untrusted file."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import onnx
from onnx import external_data_helper, helper, numpy_helper

from qdq.errors import ModelError


def densify(graph: onnx.GraphProto, path: Path, limit: int) -> None:
    """Sparse initializers, and Constants of a `sparse_value`, as dense ones, which every pass
    reads: checked first, since their indices are untrusted numbers (a dense form of `limit`
    bytes or more is refused). Their external data, if any, is read from the model's folder,
    where `load_model` checked it. (ONNX Runtime's rewrite had turned a sparse Constant into a
    sparse initializer of int8 indices, which it then refused to load.)"""
    folder = str(path.resolve().parent)
    for sparse in graph.sparse_initializer:
        graph.initializer.append(_dense(sparse, sparse.values.name, path, limit, folder))
    del graph.sparse_initializer[:]
    for node in graph.node:
        sparse_value = [a for a in node.attribute if a.name == "sparse_value"]
        if node.op_type == "Constant" and sparse_value:
            dense = _dense(sparse_value[0].sparse_tensor, node.output[0], path, limit, folder)
            del node.attribute[:]
            node.attribute.append(helper.make_attribute("value", dense))


def _dense(
    sparse: onnx.SparseTensorProto, name: str, path: Path, limit: int, folder: str
) -> onnx.TensorProto:
    for tensor in (sparse.values, sparse.indices):
        if external_data_helper.uses_external_data(tensor):
            external_data_helper.load_external_data_for_tensor(tensor, folder)
    dims = tuple(sparse.dims)
    values = numpy_helper.to_array(sparse.values)
    indices = numpy_helper.to_array(sparse.indices).astype(np.int64)
    if values.itemsize * math.prod(dims) >= limit:
        raise ModelError(f"{path}: sparse tensor {name!r} is {dims} dense")
    size = math.prod(dims)
    if indices.ndim == 2 and indices.shape[1] == len(dims):  # one row of coordinates each
        inside = ((indices >= 0) & (indices < np.array(dims, np.int64))).all()
        flat = np.ravel_multi_index(indices.T, dims) if inside else np.full(len(indices), -1)
    else:
        flat = indices.reshape(-1) if indices.ndim == 1 else np.full(1, -1)
    if flat.shape != values.shape[:1] or not ((flat >= 0) & (flat < size)).all():
        raise ModelError(
            f"{path}: sparse tensor {name!r} has indices outside its shape {list(dims)}, or "
            "not one per value"
        )
    dense = np.zeros(size, values.dtype)
    dense[flat] = values.reshape(len(flat))
    return numpy_helper.from_array(dense.reshape(dims), name)
