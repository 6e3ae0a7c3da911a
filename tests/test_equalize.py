"""Cross-layer equalization: function unchanged, ranges equal, per-tensor INT8 rescued."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from qdq.graph.config import QuantConfig
from qdq.graph.equalize import _pairs, equalize
from qdq.graph.structure import GraphIndex
from qdq.pipeline import prepare, quantize_model

DIGITS = Path(__file__).resolve().parents[1] / "examples" / "digits"


def skewed_depthwise_model(seed: int = 0) -> onnx.ModelProto:
    """The bundled depthwise digits model with ReLU for ReLU6, then each conv pair's channels
    rescaled by random factors 10^U(-1.5, 1.5) across the ReLU: the same function, but channel
    ranges that differ 1000-fold, as BatchNorm folding leaves real depthwise networks."""
    model, _, _ = prepare(onnx.load(str(DIGITS / "mobilenet.onnx")), per_channel=True)
    for node in model.graph.node:
        if node.op_type == "Clip":
            node.op_type = "Relu"
            del node.input[1:]
    used = {name for node in model.graph.node for name in node.input}
    kept = [t for t in model.graph.initializer if t.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    rng = np.random.default_rng(seed)
    inits = {t.name: t for t in model.graph.initializer}
    for first, second in _pairs(GraphIndex(model)):
        w1, b1, w2 = (numpy_helper.to_array(inits[n]) for n in (*first.input[1:3], second.input[1]))
        c = 10 ** rng.uniform(-1.5, 1.5, w1.shape[0])
        into = c.reshape(-1, 1, 1, 1) if w2.shape[1] == 1 else c.reshape(1, -1, 1, 1)
        for name, array in zip(
            (*first.input[1:3], second.input[1]),
            (w1 * c.reshape(-1, 1, 1, 1), b1 * c, w2 / into),
            strict=True,
        ):
            inits[name].CopyFrom(numpy_helper.from_array(array.astype(np.float32), name))
    return model


def accuracy(path: Path) -> float:
    with np.load(DIGITS / "test.npz") as test:
        logits = ort.InferenceSession(str(path)).run(None, {"input": test["input"]})[0]
        return float((logits.argmax(axis=1) == test["label"]).mean())


def test_equalization_keeps_the_function_and_equalizes_ranges():
    model = skewed_depthwise_model()
    x = np.load(DIGITS / "calib.npz")["input"][:64]
    before = ort.InferenceSession(model.SerializeToString()).run(None, {"input": x})[0]
    equalized, divided = equalize(model)
    after = ort.InferenceSession(equalized.SerializeToString()).run(None, {"input": x})[0]
    assert len(divided) == 6
    np.testing.assert_allclose(after, before, rtol=1e-4, atol=1e-4)
    inits = {t.name: numpy_helper.to_array(t) for t in equalized.graph.initializer}
    for first, second in _pairs(GraphIndex(equalized)):
        w1, w2 = inits[first.input[1]], inits[second.input[1]]
        r1 = np.abs(w1).reshape(len(w1), -1).max(axis=1)
        by_input = w2 if w2.shape[1] == 1 else np.swapaxes(w2, 0, 1)
        r2 = np.abs(by_input).reshape(len(by_input), -1).max(axis=1)
        np.testing.assert_allclose(r1, r2, rtol=1e-3)


@pytest.mark.parametrize("bias_correction", [False, True])
def test_cle_rescues_per_tensor_int8_of_a_depthwise_network(tmp_path, bias_correction):
    source = tmp_path / "skewed.onnx"
    onnx.save(skewed_depthwise_model(), str(source))
    float_accuracy = accuracy(source)
    plain, rescued = tmp_path / "plain.onnx", tmp_path / "cle.onnx"
    config = QuantConfig(per_channel=False, bias_correction=bias_correction)
    quantize_model(source, plain, DIGITS / "calib.npz", config)
    config = QuantConfig(per_channel=False, bias_correction=bias_correction, equalize=True)
    quantize_model(source, rescued, DIGITS / "calib.npz", config)
    assert accuracy(plain) < 0.5  # collapses, as in the DFQ paper's MobileNetV2 per-layer INT8
    assert accuracy(rescued) >= float_accuracy - 0.01
