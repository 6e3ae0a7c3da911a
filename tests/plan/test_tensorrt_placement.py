"""--preset tensorrt: Q/DQ where TensorRT's explicit-quantization rules expect them."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from qdq.config import RUN_PRESETS
from qdq.pipeline import quantize_model

from conftest import DIGITS

WEIGHTED = {"Conv", "Gemm", "MatMul"}


@pytest.fixture(scope="module", params=["cnn", "mobilenet", "transformer"])
def placed(request, tmp_path_factory) -> tuple[onnx.ModelProto, onnx.ModelProto]:
    out = tmp_path_factory.mktemp("trt") / f"{request.param}.onnx"
    source = DIGITS / f"{request.param}.onnx"
    quantize_model(source, out, DIGITS / "calib.npz", RUN_PRESETS["tensorrt"])
    return onnx.load(str(source)), onnx.load(str(out))


def _graph(model: onnx.ModelProto):
    producer = {o: n for n in model.graph.node for o in n.output}
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    return producer, inits


def test_every_dequantized_activation_feeds_a_weighted_op_or_a_residual_add(placed):
    _, model = placed
    producer, _ = _graph(model)
    readers = {
        n.op_type
        for n in model.graph.node
        for i in n.input
        if i in producer
        and producer[i].op_type == "DequantizeLinear"
        and producer[i].input[0] in producer
    }
    assert readers <= WEIGHTED | {"Add"}


def test_every_weighted_op_reads_int8_activations_and_per_channel_weights(placed):
    _, model = placed
    producer, inits = _graph(model)
    for node in model.graph.node:
        if node.op_type not in WEIGHTED:
            continue
        for name in node.input[:2]:
            dq = producer[name]
            assert dq.op_type == "DequantizeLinear", (node.name, name)
            zero_point = inits[dq.input[2]]
            assert zero_point.dtype == np.int8
            assert not zero_point.any()
            codes = inits.get(dq.input[0])
            if codes is not None and codes.ndim >= 2:  # a weight: per output channel
                axis = next((a.i for a in dq.attribute if a.name == "axis"), 1)
                assert zero_point.size == codes.shape[axis] > 1
        if len(node.input) > 2:  # the bias stays float: TensorRT has no int32 DQ
            assert node.input[2] in inits
            assert inits[node.input[2]].dtype == np.float32


def test_residual_adds_read_both_inputs_through_qdq_and_bias_adds_stay_float(placed):
    source, model = placed
    producer, constants = _graph(model)  # prepared: Constant nodes became initializers

    def dequantized(name: str) -> bool:
        return name in producer and producer[name].op_type == "DequantizeLinear"

    adds = [n for n in model.graph.node if n.op_type == "Add"]
    for node in adds:
        residual = not any(i in constants for i in node.input)
        assert all(dequantized(i) for i in node.input) == residual, node.name
    # the transformer's 4 skip connections (2 layers x attention, feed-forward) stay Adds
    residuals = sum(all(dequantized(i) for i in n.input) for n in adds)
    assert residuals == (4 if source.graph.node[-1].op_type == "Gemm" and len(adds) > 4 else 0)
