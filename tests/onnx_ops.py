"""One-node ONNX models for parity tests against onnx.reference and ONNX Runtime."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from qdq import QScheme

CODE_DTYPES = {
    (8, True): np.dtype(np.int8),
    (8, False): np.dtype(np.uint8),
    (16, True): np.dtype(np.int16),
    (16, False): np.dtype(np.uint16),
    (4, True): np.dtype(ml_dtypes.int4),
    (4, False): np.dtype(ml_dtypes.uint4),
    (2, True): np.dtype(ml_dtypes.int2),
    (2, False): np.dtype(ml_dtypes.uint2),
}


def onnx_code_dtype(scheme: QScheme) -> np.dtype:
    return CODE_DTYPES[scheme.bits, scheme.signed]


def quantize_linear_model(
    x: np.ndarray,
    scale: np.ndarray,
    zero_point: np.ndarray,
    axis: int = 1,
    block_size: int = 0,
    op: str = "QuantizeLinear",
) -> onnx.ModelProto:
    """`op(x, scale, zero_point)` with the data as an input (Q) or an initializer (DQ)."""
    attrs = {"axis": axis}
    if block_size:
        attrs["block_size"] = block_size
    inits = [numpy_helper.from_array(scale, "scale"), numpy_helper.from_array(zero_point, "zp")]
    inputs = []
    if op == "QuantizeLinear":
        inputs.append(helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, x.shape))
        out_type = helper.np_dtype_to_tensor_dtype(zero_point.dtype)
    else:
        inits.append(numpy_helper.from_array(x, "x"))
        out_type = onnx.TensorProto.FLOAT
    node = helper.make_node(op, ["x", "scale", "zp"], ["y"], **attrs)
    graph = helper.make_graph(
        [node], "q", inputs, [helper.make_tensor_value_info("y", out_type, None)], inits
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)


def run_reference(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> np.ndarray:
    return ReferenceEvaluator(model).run(None, feeds)[0]


def run_ort(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> np.ndarray:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    return session.run(None, feeds)[0]


def quantize_dequantize_model(
    x: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, axis: int = 1, block_size: int = 0
) -> onnx.ModelProto:
    """QuantizeLinear then DequantizeLinear: float out, for int4, which ORT cannot hand to NumPy."""
    model = quantize_linear_model(x, scale, zero_point, axis, block_size)
    attrs = {"axis": axis} | ({"block_size": block_size} if block_size else {})
    model.graph.node[0].output[0] = "q"
    dq = helper.make_node("DequantizeLinear", ["q", "scale", "zp"], ["y"], **attrs)
    model.graph.node.append(dq)
    model.graph.output[0].type.tensor_type.elem_type = onnx.TensorProto.FLOAT
    return model
