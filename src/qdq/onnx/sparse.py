"""Sparse initializers made dense: every pass reads dense constants, and a sparse one had
crashed the engine and the quantized model's check (ONNX's checker and ONNX Runtime accept
them). Their values and indices are checked like any other tensor of an untrusted file."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import onnx
from onnx import external_data_helper, numpy_helper

from qdq.errors import ModelError


def densify(graph: onnx.GraphProto, path: Path, limit: int) -> None:
    """Sparse initializers as dense ones, which every pass reads: checked first, since their
    indices are untrusted numbers (a dense form of `limit` bytes or more is refused). Their
    external data, if any, is read from the model's folder, where `load_model` checked it."""
    folder = str(path.resolve().parent)
    for sparse in graph.sparse_initializer:
        for tensor in (sparse.values, sparse.indices):
            if external_data_helper.uses_external_data(tensor):
                external_data_helper.load_external_data_for_tensor(tensor, folder)
        dims = tuple(sparse.dims)
        values = numpy_helper.to_array(sparse.values)
        indices = numpy_helper.to_array(sparse.indices).astype(np.int64)
        if values.itemsize * math.prod(dims) >= limit:
            raise ModelError(f"{path}: sparse initializer {sparse.values.name!r} is {dims} dense")
        size = math.prod(dims)
        if indices.ndim == 2 and indices.shape[1] == len(dims):  # one row of coordinates each
            inside = ((indices >= 0) & (indices < np.array(dims, np.int64))).all()
            flat = np.ravel_multi_index(indices.T, dims) if inside else np.full(len(indices), -1)
        else:
            flat = indices.reshape(-1) if indices.ndim == 1 else np.full(1, -1)
        if flat.shape != values.shape[:1] or not ((flat >= 0) & (flat < size)).all():
            raise ModelError(
                f"{path}: sparse initializer {sparse.values.name!r} has indices outside its "
                f"shape {list(dims)}, or not one per value"
            )
        dense = np.zeros(size, values.dtype)
        dense[flat] = values.reshape(len(flat))
        graph.initializer.append(numpy_helper.from_array(dense.reshape(dims), sparse.values.name))
    del graph.sparse_initializer[:]
