"""Preparing a model with ONNX Runtime's rewrites leaves a graph ONNX Runtime can rewrite again."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort

import models
from qdq.onnx.model import OWN_SUFFIX, optimize
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
