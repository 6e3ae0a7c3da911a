"""LSTMs with int8 weights (ONNX Runtime's DynamicQuantizeLSTM): what the file holds, how close
it runs to FP32, when the frontier takes it, and when it may not."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from sklearn.datasets import load_digits

from qdq.config import QuantConfig
from qdq.onnx.graph import GraphIndex
from qdq.onnx.sessions import open_session
from qdq.passes import insert_qdq
from qdq.passes.recurrent import quantize_lstm_weights
from qdq.pipeline import inspect_model, quantize_model
from qdq.plan import frontier
from qdq.plan.recurrent import RUNTIME_INT8, runtime_int8_lstms
from qdq.qat.convert import QdqGraph
from qdq.report.compare import compare_models
from qdq.report.measure import measure
from qdq.scheme import INT4_WEIGHTS
from quantize_and_run import sqnr_db

HIDDEN, CLASSES = 16, 10


def crnn() -> onnx.ModelProto:
    """A CRNN's shape (ddddocr's captcha recognizer, small): a convolution over the columns of
    an 8 x 8 digit, a bidirectional LSTM over them, a linear layer per step."""
    rng = np.random.default_rng(0)

    def weight(name: str, *shape: int, gain: float = 1.0) -> onnx.TensorProto:
        values = rng.normal(0, gain / np.sqrt(shape[-1]), shape).astype(np.float32)
        return numpy_helper.from_array(values, name)

    nodes = [
        helper.make_node("Conv", ["x", "conv_w", "conv_b"], ["c"], "conv", pads=[1, 1]),
        helper.make_node("Relu", ["c"], ["r"], "relu"),
        helper.make_node("Transpose", ["r"], ["seq"], "to_steps", perm=[2, 0, 1]),
        helper.make_node(
            "LSTM",
            ["seq", "lstm_w", "lstm_r", "lstm_b"],
            ["y"],
            "lstm",
            hidden_size=HIDDEN,
            direction="bidirectional",
        ),
        helper.make_node("Transpose", ["y"], ["yt"], "to_batch", perm=[2, 0, 1, 3]),
        helper.make_node("Reshape", ["yt", "shape"], ["steps"], "join_directions"),
        helper.make_node("MatMul", ["steps", "out_w"], ["logits"], "classify"),
    ]
    inits = [
        weight("conv_w", 16, 8, 3),
        numpy_helper.from_array(np.full(16, 0.1, np.float32), "conv_b"),
        weight("lstm_w", 2, 4 * HIDDEN, 16, gain=2.0),
        weight("lstm_r", 2, 4 * HIDDEN, HIDDEN, gain=2.0),
        numpy_helper.from_array(np.zeros((2, 8 * HIDDEN), np.float32), "lstm_b"),
        numpy_helper.from_array(np.array([0, 0, 2 * HIDDEN], np.int64), "shape"),
        weight("out_w", 2 * HIDDEN, CLASSES),
    ]
    graph = helper.make_graph(
        nodes,
        "crnn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 8, CLASSES])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def digits(count: int, start: int = 0) -> np.ndarray:
    """Real 8 x 8 digits scaled to [0, 1]: their columns are the sequence's steps."""
    images = load_digits().images[start : start + count].astype(np.float32) / 16
    return np.ascontiguousarray(images)


@pytest.fixture
def files(tmp_path: Path) -> tuple[Path, Path]:
    source, calib = tmp_path / "crnn.onnx", tmp_path / "calib.npy"
    onnx.save(crnn(), source)
    np.save(calib, digits(128))
    return source, calib


def test_an_lstm_with_int8_weights_runs_in_onnx_runtime_close_to_float():
    model = crnn()
    quantized = crnn()
    quantize_lstm_weights(quantized, ["lstm"])
    (node,) = [n for n in quantized.graph.node if n.name == "lstm"]
    assert (node.op_type, node.domain) == ("DynamicQuantizeLSTM", "com.microsoft")
    inits = {t.name: numpy_helper.to_array(t) for t in quantized.graph.initializer}
    assert not {"lstm_w", "lstm_r"} & set(inits)  # no float copy left beside the codes
    assert inits["lstm_W_int8"].dtype == np.int8
    assert inits["lstm_W_int8"].shape == (2, 16, 4 * HIDDEN)  # transposed, as the op reads it
    assert inits["lstm_R_scale"].shape == (2, 4 * HIDDEN)  # one scale per gate row
    assert quantized.ByteSize() < model.ByteSize() * 0.6  # 0.49: the LSTM is most of it
    x = digits(64, start=1000)
    want = open_session(model).run(None, {"x": x})[0]
    got = open_session(quantized).run(None, {"x": x})[0]
    assert sqnr_db(want, got) > 30  # 40.3 dB here: the op rounds its input and state as it runs


def test_an_lstm_keeps_its_attributes_as_they_are_even_an_empty_list():
    """`activation_alpha=[]` is valid ONNX and ONNX Runtime runs it; rebuilt from Python values,
    the node had no type to give the empty list, and the rewrite failed."""
    model, quantized = crnn(), crnn()
    for m in (model, quantized):
        (node,) = [n for n in m.graph.node if n.name == "lstm"]
        empty = helper.make_attribute("activation_alpha", [], attr_type=onnx.AttributeProto.FLOATS)
        node.attribute.append(empty)
    quantize_lstm_weights(quantized, ["lstm"])
    (node,) = [n for n in quantized.graph.node if n.name == "lstm"]
    assert {a.name for a in node.attribute} == {"hidden_size", "direction", "activation_alpha"}
    x = digits(64, start=1000)
    want = open_session(model).run(None, {"x": x})[0]
    assert sqnr_db(want, open_session(quantized).run(None, {"x": x})[0]) > 30


def _timed_by_kind(models: list[onnx.ModelProto], *_: object) -> list[float]:
    """Latencies as given (a loaded machine's timing is no test): an int8-weight LSTM twice as
    fast as a plan without one, FP32 (no Q/DQ at all) the slowest."""

    def ms(model: onnx.ModelProto) -> float:
        ops = {n.op_type for n in model.graph.node}
        return 0.5 if "DynamicQuantizeLSTM" in ops else 1.0 if "QuantizeLinear" in ops else 2.0

    return [ms(m) for m in models]


@pytest.mark.parametrize("prefer", ["balanced", "speed"])
def test_the_frontier_takes_int8_lstm_weights_where_they_pay(files, tmp_path, monkeypatch, prefer):
    monkeypatch.setattr(frontier, "latencies_ms", _timed_by_kind)
    source, calib = files
    out = tmp_path / "q.onnx"
    config = QuantConfig(prefer=prefer, saturation="ignore")
    report = quantize_model(source, out, calib, config)
    (chosen,) = [c for c in report.candidates if c.chosen]
    assert chosen.name.endswith(", LSTM weights int8")
    assert chosen.latency_ms < min(c.latency_ms for c in report.candidates if not c.chosen)
    ops = {n.op_type for n in onnx.load(out).graph.node}
    assert {"DynamicQuantizeLSTM", "QuantizeLinear"} <= ops
    assert "LSTM" not in ops
    assert "int8 weights only: LSTM lstm:" in report.summary(out)
    assert "lstm" in {d.node for d in report.quantized}
    x = digits(64, start=1000)
    want = open_session(source).run(None, {"x": x})[0]
    assert sqnr_db(want, open_session(out).run(None, {"x": x})[0]) > 25


def test_an_lstm_the_frontier_keeps_float_says_why(files, tmp_path, monkeypatch):
    """`--prefer accuracy` takes the plan whose LSTM is float (its twin scores lower): the
    LSTM's reason says the measured trade kept it float, as every other float-kept node's does,
    not the rule's "may give it int8 weights"."""
    monkeypatch.setattr(frontier, "latencies_ms", _timed_by_kind)
    source, calib = files
    out = tmp_path / "q.onnx"
    report = quantize_model(source, out, calib, QuantConfig(prefer="accuracy", saturation="ignore"))
    (chosen,) = [c for c in report.candidates if c.chosen]
    assert not chosen.name.endswith("LSTM weights int8")
    (lstm,) = [d for d in report.decisions if d.node == "lstm"]
    want = frontier.REASON.format(prefer="accuracy", name=chosen.name)
    assert (lstm.quantized, lstm.dynamic, lstm.reason) == (False, False, want)
    assert "LSTM" in {n.op_type for n in onnx.load(out).graph.node}


def test_prefer_int8_gives_an_lstm_int8_weights_untimed(files, tmp_path, monkeypatch):
    """`--prefer int8`, every op that can be int8 and nothing timed: the LSTM too."""

    def timed(*_: object) -> list[float]:
        raise AssertionError("timed")

    monkeypatch.setattr(frontier, "latencies_ms", timed)
    source, calib = files
    out = tmp_path / "q.onnx"
    report = quantize_model(source, out, calib, QuantConfig(prefer="int8", saturation="ignore"))
    assert report.candidates == []
    assert "DynamicQuantizeLSTM" in {n.op_type for n in onnx.load(out).graph.node}
    assert "int8 weights only: LSTM lstm:" in report.summary(out)


def test_a_weight_two_lstms_read_is_stored_once():
    """Two LSTMs over the same weights (one sequence read forwards and backwards): one set of
    codes and scales in the file, as there was one float copy."""
    rng = np.random.default_rng(0)
    w = rng.normal(0, 0.3, (1, 4 * HIDDEN, 8)).astype(np.float32)
    r = rng.normal(0, 0.3, (1, 4 * HIDDEN, HIDDEN)).astype(np.float32)
    lstm = {"hidden_size": HIDDEN}
    nodes = [
        helper.make_node("LSTM", ["x", "w", "r"], ["a"], "forwards", **lstm),
        helper.make_node("LSTM", ["x", "w", "r"], ["b"], "backwards", direction="reverse", **lstm),
        helper.make_node("Add", ["a", "b"], ["y"], "both"),
    ]
    graph = helper.make_graph(
        nodes,
        "shared",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [12, 2, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(r, "r")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    quantized = onnx.ModelProto()
    quantized.CopyFrom(model)
    quantize_lstm_weights(quantized, ["forwards", "backwards"])
    codes = [t.name for t in quantized.graph.initializer if t.data_type == TensorProto.INT8]
    assert len(codes) == 4  # W's and R's codes and zero points, once
    x = rng.normal(size=(12, 2, 8)).astype(np.float32)
    want = open_session(model).run(None, {"x": x})[0]
    assert sqnr_db(want, open_session(quantized).run(None, {"x": x})[0]) > 30


@pytest.mark.parametrize("prefer", ["balanced", "int8"])
def test_a_failing_lstm_rewrite_skips_that_stage_alone(files, tmp_path, monkeypatch, prefer):
    """An LSTM the rewrite cannot take costs its int8 weights only: the frontier's choice stands
    with every candidate it timed, the note names the stage, and the file is written."""
    monkeypatch.setattr(frontier, "latencies_ms", _timed_by_kind)
    source, calib = files

    def failing(model: onnx.ModelProto, names: list[str]) -> None:
        if names:
            raise ValueError("no such LSTM")

    monkeypatch.setattr(insert_qdq, "quantize_lstm_weights", failing)
    out = tmp_path / "q.onnx"
    report = quantize_model(source, out, calib, QuantConfig(prefer=prefer, saturation="ignore"))
    assert "skipped int8 LSTM weights: it failed on this model (no such LSTM)" in report.notes
    assert {"LSTM", "QuantizeLinear"} <= {n.op_type for n in onnx.load(out).graph.node}
    if prefer == "balanced":
        assert len(report.candidates) >= 2
        assert not any(c.name.endswith("LSTM weights int8") for c in report.candidates)


def test_a_model_of_one_lstm_gets_int8_weights_where_they_pay(tmp_path, monkeypatch):
    """g2p-id's LSTM encoder alone had no node qdq could quantize (docs/unseen.md): no frontier,
    so the plan and its twin are timed beside FP32 on their own; the plan without int8 is named
    so (it had been called "all int8")."""
    model = crnn()
    keep = {"to_steps", "lstm", "to_batch"}
    kept = [n for n in model.graph.node if n.name in keep]
    del model.graph.node[:]
    model.graph.node.extend(kept)
    model.graph.node[0].input[0] = "x"
    del model.graph.input[:], model.graph.output[:]
    model.graph.input.append(helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 16, 8]))
    model.graph.output.append(helper.make_tensor_value_info("yt", TensorProto.FLOAT, None))
    source, calib, out = tmp_path / "lstm.onnx", tmp_path / "calib.npy", tmp_path / "q.onnx"
    onnx.save(model, source)
    np.save(calib, np.tile(digits(128), (1, 2, 1)))  # 16 features a step, as the LSTM reads
    monkeypatch.setattr(frontier, "latencies_ms", _timed_by_kind)
    report = quantize_model(source, out, calib, QuantConfig(saturation="ignore"))
    assert [(c.name, c.chosen) for c in report.candidates] == [
        ("no int8 layers", False),
        ("no int8 layers, LSTM weights int8", True),
    ]
    assert report.float_ms == 2.0
    assert [d.node for d in report.quantized] == ["lstm"]
    assert "no node was quantized" not in report.summary(out)


def test_an_lstm_stays_float_where_excluded_unfit_or_its_weights_must_not_saturate():
    index = GraphIndex(crnn())
    assert runtime_int8_lstms(index, QuantConfig(saturation="ignore")) == ["lstm"]
    assert runtime_int8_lstms(index, QuantConfig(saturation="avoid")) == []
    assert runtime_int8_lstms(index, QuantConfig(saturation="ignore", exclude=("LSTM",))) == []
    assert runtime_int8_lstms(index, QuantConfig(saturation="ignore", exclude=("lstm",))) == []
    four_bit = QuantConfig(saturation="ignore", weights=INT4_WEIGHTS)
    assert runtime_int8_lstms(index, four_bit) == []
    tensorrt = QuantConfig(saturation="ignore", placement="tensorrt")
    assert runtime_int8_lstms(index, tensorrt) == []  # the op is ONNX Runtime's
    broken = crnn()
    w = next(t for t in broken.graph.initializer if t.name == "lstm_w")
    values = numpy_helper.to_array(w).copy()
    values[0, 0, 0] = np.nan
    w.CopyFrom(numpy_helper.from_array(values, "lstm_w"))
    assert runtime_int8_lstms(GraphIndex(broken), QuantConfig(saturation="ignore")) == []


def test_finetune_reads_an_int8_weight_lstm_as_the_float_lstm_of_its_weights():
    """`qdq finetune` converts a file with DynamicQuantizeLSTM: its torch copy runs the LSTM on
    the dequantized weights, which the op's own rounding of input and state leaves close."""
    quantized = crnn()
    quantize_lstm_weights(quantized, ["lstm"])
    x = digits(16, start=1000)
    want = open_session(quantized).run(None, {"x": x})[0]
    config = QuantConfig()
    with torch.no_grad():
        got = QdqGraph(quantized, config.weights, config.activations)({"x": torch.from_numpy(x)})
    assert sqnr_db(want, got[0].numpy()) > 30


def test_the_report_shows_an_lstm_on_int8_weights_as_such(tmp_path):
    """`qdq report`'s per-layer table: the DynamicQuantizeLSTM row reads "int8 weights", with
    its reason, without the run's decisions or with the float model's (`qdq report` on two
    files passes `inspect_model`'s, where the LSTM is float)."""
    source, quantized = tmp_path / "crnn.onnx", tmp_path / "q.onnx"
    onnx.save(crnn(), source)
    model = crnn()
    quantize_lstm_weights(model, ["lstm"])
    onnx.save(model, quantized)
    data = tmp_path / "held.npy"
    np.save(data, digits(16, start=1000))
    for decisions in (None, inspect_model(source)):  # `qdq report` passes the float model's
        rows = {r.node: r for r in measure(source, quantized, data, decisions).layers}
        assert rows["lstm"].weights_only
        assert rows["lstm"].reason == RUNTIME_INT8
        assert not rows["conv"].weights_only


def test_compare_measures_an_lstm_on_int8_weights_at_its_output(tmp_path):
    """`qdq compare`'s per-layer table: an LSTM on int8 weights has no Q/DQ pair to measure, so
    its outputs (an output left out, "", aside) are measured as they are, against the float
    LSTM's: near the float model with only the weights rounded, and no longer there once the
    weights are changed."""
    source, quantized = tmp_path / "crnn.onnx", tmp_path / "q.onnx"
    model = crnn()
    next(n for n in model.graph.node if n.name == "lstm").output.extend(["", "cell"])
    onnx.save(model, source)
    quantize_lstm_weights(model, ["lstm"])
    onnx.save(model, quantized)
    data = tmp_path / "held.npy"
    np.save(data, digits(16, start=1000))
    layers = compare_models(source, quantized, data).layers
    assert set(layers) == {"y", "cell"}
    assert layers["y"].sqnr_db > 30
    broken = onnx.load(quantized)
    codes = next(t for t in broken.graph.initializer if t.name == "lstm_W_int8")
    codes.CopyFrom(numpy_helper.from_array(-numpy_helper.to_array(codes), codes.name))
    onnx.save(broken, quantized)
    assert compare_models(source, quantized, data).layers["y"].sqnr_db < 10
