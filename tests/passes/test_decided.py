"""A model that outputs no float tensor (a label, a class map, a mask) is judged on the float
tensors its outputs are decided from, and written with its own outputs only."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

from qdq.passes.decided import decided_from
from qdq.pipeline import quantize_model
from qdq.report.compare import compare_models
from qdq.report.html import render
from qdq.report.measure import measure

from conftest import DIGITS


def _labelled(cast: bool = False) -> onnx.ModelProto:
    """The digits CNN with its ArgMax (and a Cast to int32) in the graph: a label output."""
    model = onnx.load(str(DIGITS / "cnn.onnx"))
    logits = model.graph.output[0].name
    nodes = [helper.make_node("ArgMax", [logits], ["index"], axis=1, keepdims=0, name="argmax")]
    if cast:
        nodes.append(helper.make_node("Cast", ["index"], ["label"], to=TensorProto.INT32))
    kind = TensorProto.INT32 if cast else TensorProto.INT64
    model.graph.node.extend(nodes)
    del model.graph.output[:]
    model.graph.output.append(helper.make_tensor_value_info(nodes[-1].output[0], kind, ["N"]))
    return model


def test_the_tensors_read_on_the_way_to_non_float_outputs_are_found():
    assert decided_from(onnx.shape_inference.infer_shapes(_labelled(cast=True))) == ["logits"]
    assert decided_from(onnx.load(str(DIGITS / "cnn.onnx"))) == []


def test_a_cnn_that_outputs_its_label_is_planned_on_its_logits(tmp_path):
    """Blind, it had taken percentile without checks, and every candidate plan scored 'inf
    dB' (EfficientNet-Lite0 with its ArgMax: all int8, 92.0% of FP32's labels on 512 crops,
    against 94.7% planned on its logits)."""
    source, out = tmp_path / "labelled.onnx", tmp_path / "int8.onnx"
    onnx.save(_labelled(), str(source))
    report = quantize_model(source, out, DIGITS / "calib.npz")
    assert any("decided from ('logits')" in note for note in report.notes)
    assert any(note.startswith("range method") for note in report.notes)  # the choice ran
    assert all(c.score != float("inf") for c in report.candidates)
    assert report.output_sqnr["logits"] > 35
    written = onnx.load(str(out))
    assert [o.name for o in written.graph.output] == ["index"]
    x = np.load(DIGITS / "test.npz")["input"]
    labels = [
        ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
        for p in (source, out)
    ]
    assert (labels[0] == labels[1]).mean() > 0.99
    equal = f"{(labels[0] == labels[1]).mean():.2%}"
    compared = compare_models(source, out, DIGITS / "test.npz", latency_runs=1)
    assert f"output 'index': equal to FP32's at {equal}" in compared.to_text()
    page = render(measure(source, out, DIGITS / "test.npz", report.decisions, max_samples=540))
    assert f"<td class=num>{equal} equal</td>" in page  # the HTML report's summary
