"""The HTML report's pieces: profiler sums, histogram views, the layer bypass, and a page that
needs nothing from the network."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from qdq.config import preset_config
from qdq.observers import Histogram
from qdq.pipeline import quantize_model
from qdq.report.html import _number, render, write_report
from qdq.report.measure import measure
from qdq.report.profile import _per_op_type
from qdq.report.ranges import activation_view, quantized_activations, weight_views
from qdq.report.sensitivity import bypassed, layer_sensitivity

from conftest import DIGITS, quantize_cnn


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    """The digits CNN quantized, and what its report draws (200 test images)."""
    int8, report = quantize_cnn(tmp_path_factory.mktemp("digits"))
    data = measure(
        DIGITS / "cnn.onnx",
        int8,
        DIGITS / "test.npz",
        report.decisions,
        max_samples=200,
        sensitivity=True,
    )
    return int8, data


def test_profile_sums_kernel_time_per_op_type_and_skips_the_warm_up():
    events = [
        {"name": "model_run", "ts": 0, "dur": 90},  # warm-up: left out
        {"cat": "Node", "name": "a_kernel_time", "ts": 1, "dur": 50, "args": {"op_name": "Conv"}},
        {"name": "model_run", "ts": 100, "dur": 9},
        {
            "cat": "Node",
            "name": "a_kernel_time",
            "ts": 101,
            "dur": 3000,
            "args": {"op_name": "Conv"},
        },
        {"cat": "Node", "name": "a_fence_before", "ts": 102, "dur": 7, "args": {"op_name": "Conv"}},
        {
            "cat": "Node",
            "name": "b_kernel_time",
            "ts": 103,
            "dur": 1000,
            "args": {"op_name": "Relu"},
        },
        {"name": "model_run", "ts": 200, "dur": 9},
        {
            "cat": "Node",
            "name": "a_kernel_time",
            "ts": 201,
            "dur": 1000,
            "args": {"op_name": "Conv"},
        },
    ]
    # Conv: (3000 + 1000) µs over 2 runs = 2 ms per run; Relu: 1000 µs / 2 = 0.5 ms
    assert _per_op_type(events, runs=2) == {"Conv": 2.0, "Relu": 0.5}


def test_activation_view_marks_each_method_on_the_observed_range():
    x = np.random.default_rng(0).normal(size=100_000).astype(np.float32)
    hist = Histogram()
    hist.update(x)
    view = activation_view("x", hist, chosen=(-3.0, 3.0))
    assert view.counts.sum() == x.size  # regrouped, nothing lost
    assert view.edges[0] <= x.min()
    assert view.edges[-1] >= x.max()
    assert view.methods["minmax"] == (float(x.min()), float(x.max()))
    for method in ("percentile", "kl", "mse"):  # each clips the tails of a Gaussian
        lo, hi = view.methods[method]
        assert x.min() <= lo < 0 < hi <= x.max()
    assert view.closest in view.methods


@pytest.mark.parametrize("value", [5.0, 1e20])
def test_a_constant_activation_is_one_bar(value):
    """Its lone value at the histogram's edge had left nothing to regroup (ZeroDivisionError:
    `qdq report` ended in an internal error on constant data)."""
    hist = Histogram()
    hist.update(np.full(64, value, np.float32))
    view = activation_view("x", hist, chosen=(0.0, value))
    assert view.counts.sum() == 64


def test_ranges_are_read_from_the_int8_models_qdq_nodes(digits):
    int8, _ = digits
    model = onnx.load(int8)
    ranges = quantized_activations(model)
    lo, hi = ranges["/2/Relu_output_0"]  # uint8 after a ReLU: (0 - zp) * scale == 0
    assert lo == 0.0
    assert hi > 0
    weights = weight_views(model)
    assert {w.tensor for w in weights} == {
        "/0/Conv weight",
        "/3/Conv weight",
        "/7/Conv weight",
        "/12/Gemm weight",
    }
    assert all(w.lo.shape == w.hi.shape and (w.lo <= w.hi).all() for w in weights)
    assert all(w.spread >= 1 for w in weights)


def test_a_bypassed_layer_reads_float_and_its_consumer_reads_its_float_output(digits):
    int8, _ = digits
    model = bypassed(onnx.load(int8), "/3/Conv")
    nodes = {n.name: n for n in model.graph.node}
    assert nodes["/3/Conv"].input[0] == "/2/Relu_output_0"  # not its dequantized copy
    assert nodes["/6/MaxPool"].input[0] == "/5/Relu_output_0_dq"  # Relu's output stays int8
    relu = bypassed(onnx.load(int8), "/5/Relu")
    assert {n.name: n for n in relu.graph.node}["/6/MaxPool"].input[0] == "/5/Relu_output_0"


def test_a_bypassed_layer_whose_output_the_graph_returns_gives_it_float(tmp_path):
    """A quantized graph output's DequantizeLinear is named as the output: the bypass had
    kept it, and its readers on the copy (0.00 dB for the last layer of such a model)."""
    x = np.random.default_rng(3).standard_normal((24, 4)).astype(np.float32)
    w = numpy_helper.from_array(np.random.default_rng(4).standard_normal((4, 4), np.float32), "w")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["m"], name="mm"),
             helper.make_node("Relu", ["m"], ["mid"], name="relu1"),
             helper.make_node("MatMul", ["mid", "w"], ["out"], name="mm2")]  # fmt: skip
    value = helper.make_tensor_value_info
    graph = helper.make_graph(nodes, "g", [value("x", TensorProto.FLOAT, ["N", 4])],
                              [value("mid", TensorProto.FLOAT, None),
                               value("out", TensorProto.FLOAT, None)], [w])  # fmt: skip
    float_model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    config = preset_config("default", prefer="int8")
    onnx.save(float_model, tmp_path / "f.onnx")
    np.savez(tmp_path / "x.npz", x=x)
    quantize_model(tmp_path / "f.onnx", tmp_path / "q.onnx", tmp_path / "x.npz", config)
    model = bypassed(onnx.load(tmp_path / "q.onnx"), "relu1")
    nodes = {n.name: n for n in model.graph.node}
    made = {o: n for n in model.graph.node for o in n.output}
    assert made["mid"].op_type == "Identity"  # the graph output: the float value
    assert made["mid"].input[0] == nodes["relu1"].output[0] == nodes["mm2"].input[0]
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    assert session.run(["mid"], {"x": x})[0].shape == (24, 4)


def test_one_row_per_node_with_sqnr_and_sensitivity(digits):
    _, data = digits
    assert [r.node for r in data.layers][:3] == ["/0/Conv", "/2/Relu", "/3/Conv"]
    assert all(r.quantized for r in data.layers)
    assert all(r.sqnr_db is not None and r.sqnr_db > 20 for r in data.layers)
    assert all(r.sensitivity_db is not None for r in data.layers)
    sqnr = [v.sqnr_db for v in data.activations]  # the input has none: it comes last
    assert sqnr[-1] is None
    assert sqnr[:-1] == sorted(sqnr[:-1])


def test_the_page_is_one_file_that_loads_nothing(digits, tmp_path):
    _, data = digits
    page = render(data)
    assert not re.search(r"""<(script|link|img|iframe)[^>]+(src|href)=""", page)
    assert "@import" not in page
    assert page.count("<table") == 3  # the summary's two, the layers'
    size = write_report(data, tmp_path / "report.html")
    assert size == (tmp_path / "report.html").stat().st_size
    assert [p.name for p in tmp_path.iterdir()] == ["report.html"]  # no temporary left


def test_sensitivity_pools_the_float_outputs_alone(tmp_path):
    """A class index beside the logits (ArgMax, int64) is no error in dB: pooled, it had
    weighed each wrong class by how far apart the two class numbers are."""
    source, (quantized, _) = DIGITS / "cnn.onnx", quantize_cnn(tmp_path)
    models = []
    for path in (source, quantized):
        model = onnx.load(path)
        model.graph.node.append(onnx.helper.make_node("ArgMax", ["logits"], ["label"], axis=1))
        model.graph.output.append(onnx.helper.make_tensor_value_info("label", 7, None))
        models.append(model)
    feeds = [{"input": np.load(DIGITS / "calib.npz")["input"][:64]}]
    nodes = [n.name for n in onnx.load(quantized).graph.node if n.op_type == "Conv"]
    alone = layer_sensitivity(onnx.load(source), onnx.load(quantized), nodes, feeds)
    assert layer_sensitivity(*models, nodes, feeds) == alone


def test_per_tensor_weights_are_drawn_per_output_channel(tmp_path):
    """A per-tensor DequantizeLinear's axis attribute (default 1) says nothing: the charts had
    drawn the Conv's input channels and the Gemm's 64 inputs as its channels."""
    int8 = tmp_path / "per_tensor.onnx"
    quantize_model(DIGITS / "cnn.onnx", int8, DIGITS / "calib.npz",
                   preset_config("default", per_channel=False))  # fmt: skip
    views = {w.tensor: w for w in weight_views(onnx.load(int8))}
    channels = {name: len(view.lo) for name, view in views.items()}
    assert channels == {"/0/Conv weight": 16, "/3/Conv weight": 32, "/7/Conv weight": 64,
                        "/12/Gemm weight": 10}  # fmt: skip


def test_a_qoperator_files_layers_read_int8(tmp_path):
    """Its QLinearConv and QGemm rows had read "float: kept float after calibration"."""
    int8 = tmp_path / "qop.onnx"
    quantize_model(DIGITS / "cnn.onnx", int8, DIGITS / "calib.npz", output_format="qoperator")
    data = measure(DIGITS / "cnn.onnx", int8, DIGITS / "test.npz", max_samples=16)
    kernels = [r for r in data.layers if r.op_type.startswith(("QLinear", "QGemm"))]
    assert kernels
    assert all(r.quantized and "QOperator" in r.reason for r in kernels)
    assert any("QOperator file" in note for note in data.comparison.notes)


def test_a_nan_layer_reads_nan_and_sorts_last():
    assert ">NaN<" in _number(float("nan"))
    assert 'data-value="-1e9"' in _number(float("nan"))
    assert ">exact<" in _number(float("inf"))


def test_chart_labels_show_a_models_names_as_written(digits):
    """Plotly reads <br>, <b> and &entities; in titles and labels: a node named `a<br>b` had
    been drawn on two lines. Its charts get the name escaped, as the tables do."""
    from dataclasses import replace

    _, data = digits
    layers = [replace(data.layers[0], node="a<br>b&c"), *data.layers[1:]]
    figures = [json.loads(f) for f in re.findall(
        r'<script type="application/json" id="fig-\d+">(.*?)</script>',
        render(replace(data, layers=layers)))]  # fmt: skip
    labels = [y for f in figures for trace in f["data"] for y in trace.get("y") or []]
    assert "a&lt;br&gt;b&amp;c" in labels
    assert "a<br>b&c" not in labels


def test_smoothed_activations_without_a_histogram_are_counted(tmp_path):
    """SmoothQuant's divided inputs are quantized tensors the FP32 model lacks: no histogram
    can be drawn, and the page says how many (they had gone unmentioned)."""
    out = tmp_path / "q.onnx"
    run = quantize_model(DIGITS / "transformer.onnx", out, DIGITS / "calib.npz")
    assert any(n.startswith("moved the outlier channels") for n in run.notes)
    data = measure(DIGITS / "transformer.onnx", out, DIGITS / "test.npz", run.decisions,
                   max_samples=32)  # fmt: skip
    smoothed = [t for t in quantized_activations(onnx.load(out)) if t.endswith("_smoothed")]
    assert data.undrawn == len(smoothed) > 0
    assert f"{len(smoothed)} quantized activations the FP32 model does not compute" in render(data)


def test_the_layer_table_follows_the_run_where_the_model_shows_one_side():
    """Q/DQ on one side of a node the run kept float (a MaxPool reading a DequantizeLinear,
    a Relu feeding a QuantizeLinear) had read "int8: Q/DQ around it"; a QOperator file's
    MatMulIntegerToFloat and a Reshape of its codes had read float. A QGemm without an output
    scale outputs float: what reads it is float."""
    from qdq.plan.decisions import Decision
    from qdq.report.measure import _layers

    q = {"s": np.float32(0.1), "z": np.uint8(0), "w": np.ones((4, 4), np.int8)}
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"]),
        helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"]),
        helper.make_node("MaxPool", ["xd"], ["p"], name="pool", kernel_shape=[1]),
        helper.make_node("Relu", ["p"], ["r"], name="relu"),
        helper.make_node("QuantizeLinear", ["r", "s", "z"], ["rq"]),
        helper.make_node("Reshape", ["rq", "shape"], ["codes"], name="flat"),
        helper.make_node("MatMulIntegerToFloat", ["codes", "w", "s", "s"], ["y"], name="mm",
                         domain="com.microsoft"),
        helper.make_node("QGemm", ["codes", "s", "z", "w", "s", "z"], ["g"], name="qgemm",
                         domain="com.microsoft"),  # no output scale: float out
        helper.make_node("Softmax", ["g"], ["p"], name="soft"),
    ]  # fmt: skip
    inits = [numpy_helper.from_array(np.asarray(v), k) for k, v in q.items()]
    inits.append(numpy_helper.from_array(np.array([-1, 4]), "shape"))
    graph = helper.make_graph(nodes, "g", [], [], inits)
    model = helper.make_model(graph)
    decisions = [Decision("pool", "MaxPool", False, "slow in int8"),
                 Decision("relu", "Relu", False, "no int8 rule")]  # fmt: skip
    rows = {r.node: r for r in _layers(model, decisions, {})}
    assert (rows["pool"].quantized, rows["pool"].reason) == (False, "slow in int8")
    assert (rows["relu"].quantized, rows["relu"].reason) == (False, "no int8 rule")
    assert rows["flat"].quantized
    assert rows["mm"].quantized
    assert "QOperator" in rows["mm"].reason
    assert not rows["soft"].quantized  # a float-output kernel's reader reads no codes
    undecided = {r.node: r for r in _layers(model, None, {})}
    assert undecided["pool"].quantized
    assert "reads int8" in undecided["pool"].reason
