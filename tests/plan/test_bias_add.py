"""An int8 MatMul's bias Add gets an int32 bias, so that ONNX Runtime's MatMul + Add -> Gemm
fusion (fixed shapes) ends in QGemm, not in a float Gemm behind DequantizeLinears."""

from __future__ import annotations

import numpy as np
import onnx

from models import attention_block
from qdq.config import QuantConfig
from qdq.onnx.sessions import Use, open_session
from qdq.pipeline import quantize_model


def test_every_int8_linear_layer_of_a_fixed_shape_transformer_runs_as_qgemm(tmp_path):
    source, calib, out = tmp_path / "m.onnx", tmp_path / "c.npy", tmp_path / "q.onnx"
    source.write_bytes(attention_block().SerializeToString())
    np.save(calib, np.random.default_rng(0).standard_normal((32, 8, 16)).astype(np.float32))
    report = quantize_model(source, out, calib, QuantConfig(prefer="speed"))
    linear = [d for d in report.decisions if d.op_type in ("MatMul", "Gemm")]
    weighted = [d for d in linear if d.node not in ("MatMul_8", "MatMul_10")]  # q k^T, p v
    float_layers = sum(not d.quantized for d in weighted)
    optimized = tmp_path / "opt.onnx"
    open_session(out, Use.LATENCY, optimized_path=optimized)
    ops = [n.op_type for n in onnx.load(optimized).graph.node]
    # Six linear layers: q, k, v, o and the FFN's two (fused into Gemm when qdq prepares the
    # model). o, whose output stays float, ran as a float Gemm reading a float bias before.
    assert ops.count("QGemm") == 6 - float_layers
    assert ops.count("Gemm") == float_layers
