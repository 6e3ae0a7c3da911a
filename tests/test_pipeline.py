"""quantize_model end to end on the bundled digits models: accuracy, int8 kernels, formats
and presets, the output file (names, metadata) and the report; the graphs shaped like real
failures are in test_pipeline_float.py and test_pipeline_grids.py."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

import models
from qdq.config import RUN_PRESETS, QuantConfig
from qdq.onnx.model import ort_rewrite
from qdq.pipeline import inspect_model, quantize_model
from quantize_and_run import FUSED, op_counts, quantize_on, run, save, sqnr_db

from conftest import DIGITS, quantize_cnn


def accuracy(path: Path) -> float:
    with np.load(DIGITS / "test.npz") as test:
        logits = run(path, {"input": test["input"]})[0]
        return float((logits.argmax(axis=1) == test["label"]).mean())


@pytest.mark.parametrize(("name", "budget"), [("cnn", 0.5), ("mobilenet", 1.0)])
@pytest.mark.exact_int8
def test_digits_accuracy_stays_within_budget(tmp_path, name, budget):
    out = tmp_path / f"{name}_int8.onnx"
    report = quantize_model(DIGITS / f"{name}.onnx", out, DIGITS / "calib.npz")
    assert not report.kept_float
    assert accuracy(out) >= accuracy(DIGITS / f"{name}.onnx") - budget / 100
    assert out.stat().st_size < (DIGITS / f"{name}.onnx").stat().st_size


@pytest.mark.parametrize("name", ["cnn", "mobilenet"])
@pytest.mark.exact_int8
def test_every_conv_becomes_an_int8_kernel_in_onnx_runtime(tmp_path, name):
    out = tmp_path / "q.onnx"
    quantize_model(DIGITS / f"{name}.onnx", out, DIGITS / "calib.npz")
    convs = op_counts(onnx.load(str(DIGITS / f"{name}.onnx")))["Conv"]
    fused = op_counts(ort_rewrite(onnx.load(str(out)), FUSED))
    assert fused["QLinearConv"] == convs
    assert fused["Conv"] == 0
    assert fused["QGemm"] == 1  # the classifier runs in int8 too
    assert fused["QuantizeLinear"] == 1  # int8 flows from the input to the output,
    assert fused["DequantizeLinear"] == 0  # where the QGemm writes float logits itself


def test_weights_are_stored_as_integers(tmp_path):
    out = tmp_path / "q.onnx"
    quantize_model(DIGITS / "cnn.onnx", out, DIGITS / "calib.npz")
    model = onnx.load(str(out))
    types = {t.data_type for t in model.graph.initializer if len(t.dims) >= 2}
    assert types == {onnx.TensorProto.INT8}
    biases = [
        t for t in model.graph.initializer if t.name.endswith("_quantized") and len(t.dims) == 1
    ]
    assert {t.data_type for t in biases} >= {onnx.TensorProto.INT32}


def test_qoperator_format_is_made_of_integer_ops(tmp_path):
    out = tmp_path / "q.onnx"
    quantize_model(DIGITS / "cnn.onnx", out, DIGITS / "calib.npz", output_format="qoperator")
    counts = op_counts(onnx.load(str(out)))
    assert counts["QLinearConv"] == 3
    assert not counts["Conv"]
    assert accuracy(out) >= accuracy(DIGITS / "cnn.onnx") - 0.005


def test_tensorrt_preset_is_symmetric_int8_with_narrow_per_channel_weights(tmp_path):
    out = tmp_path / "q.onnx"
    quantize_model(DIGITS / "cnn.onnx", out, DIGITS / "calib.npz", RUN_PRESETS["tensorrt"])
    model = onnx.load(str(out))
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type != "DequantizeLinear":
            continue
        codes = inits.get(node.input[0])
        zero_point = inits[node.input[2]]
        assert not zero_point.any(), node.name
        if codes is not None and codes.ndim >= 2:  # a weight
            assert codes.dtype == np.int8
            assert codes.min() >= -127
            assert {a.name: a.i for a in node.attribute}.get("axis", 1) == 0
        elif codes is None:
            assert zero_point.dtype == np.int8  # activations


def test_a_model_with_its_batch_axis_fixed_at_1_is_fed_one_sample_at_a_time(tmp_path):
    model = onnx.load(str(DIGITS / "cnn.onnx"))  # exporters often fix the batch axis at 1
    for value in (*model.graph.input, *model.graph.output):
        value.type.tensor_type.shape.dim[0].dim_value = 1
    source, out = save(model, tmp_path), tmp_path / "q.onnx"
    quantize_model(source, out, DIGITS / "calib.npz")
    with np.load(DIGITS / "test.npz") as test:
        x = test["input"][:64]
    want = np.concatenate([run(source, {"input": x[i : i + 1]})[0] for i in range(len(x))])
    got = np.concatenate([run(out, {"input": x[i : i + 1]})[0] for i in range(len(x))])
    assert sqnr_db(want, got) > 35  # as good as with a free batch axis (42 dB)


def test_a_model_whose_input_and_output_declare_no_shape_quantizes_as_its_source(tmp_path):
    """ONNX's checker wants shapes on the graph's inputs and outputs; ONNX Runtime runs a
    model without them (any rank goes), and qdq had refused it as "not a valid ONNX model".
    Planned with its samples' rank, it gets the shaped model's plan; the file keeps the
    interface without shapes."""
    model = onnx.load(str(DIGITS / "cnn.onnx"))
    for value in (*model.graph.input, *model.graph.output):
        value.type.tensor_type.ClearField("shape")
    source, out = save(model, tmp_path), tmp_path / "q.onnx"
    report = quantize_model(source, out, DIGITS / "calib.npz")
    shaped = quantize_cnn(tmp_path)[1]
    assert report.decisions == shaped.decisions
    assert report.output_sqnr == pytest.approx(shaped.output_sqnr, abs=0.01)
    written = onnx.load(str(out)).graph
    assert not any(v.type.tensor_type.HasField("shape") for v in (*written.input, *written.output))
    with np.load(DIGITS / "test.npz") as test:
        x = test["input"][:64]
    assert sqnr_db(run(source, {"input": x})[0], run(out, {"input": x})[0]) > 35


@pytest.mark.parametrize("output_format", ["qdq", "qoperator"])
def test_the_file_declares_its_interface_as_the_source_does(tmp_path, output_format):
    """Axes the source leaves free stay free: shape inference and ONNX Runtime's rewrite had
    declared its (?, ?) output (N, 10), and its (?, 1, 8, 8) input ('unk__0', 1, 8, 8)."""
    model = onnx.load(str(DIGITS / "cnn.onnx"))
    for value in (*model.graph.input, *model.graph.output):
        value.type.tensor_type.shape.dim[0].ClearField("dim_param")
        value.type.tensor_type.shape.dim[0].ClearField("dim_value")
    model.graph.output[0].type.tensor_type.shape.dim[1].ClearField("dim_value")
    source, out = save(model, tmp_path), tmp_path / "q.onnx"
    quantize_model(source, out, DIGITS / "calib.npz", QuantConfig(), output_format=output_format)
    declared = onnx.load(str(out)).graph
    for want, got in zip((*model.graph.input, *model.graph.output), (*declared.input,
                         *declared.output), strict=True):  # fmt: skip
        assert got.type.tensor_type.shape == want.type.tensor_type.shape


def test_clips_of_several_lengths_calibrate_a_model_with_a_free_time_axis(tmp_path):
    rng = np.random.default_rng(0)
    weights = [rng.normal(size=(8, 1, 5)), rng.normal(size=(4, 8, 3))]
    nodes = [
        onnx.helper.make_node("Conv", ["x", "w0"], ["a"], pads=[2, 2]),
        onnx.helper.make_node("Relu", ["a"], ["b"]),
        onnx.helper.make_node("Conv", ["b", "w1"], ["y"], pads=[1, 1]),
    ]
    graph = onnx.helper.make_graph(
        nodes,
        "clips",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 1, "T"])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 4, "T"])],
        [
            onnx.numpy_helper.from_array(w.astype(np.float32), f"w{i}")
            for i, w in enumerate(weights)
        ],
    )
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    source = save(model, tmp_path)
    clips = tmp_path / "clips"
    clips.mkdir()
    for i in range(24):
        np.save(clips / f"{i:02d}.npy", rng.normal(size=(1, 100 + 7 * i)).astype(np.float32))
    report = quantize_model(source, tmp_path / "q.onnx", clips)
    assert sum(d.quantized for d in report.decisions if d.op_type == "Conv") == 2
    assert report.output_sqnr["y"] > 30


def test_a_model_with_a_scalar_input_quantizes_on_a_value_per_sample(tmp_path):
    model = onnx.load(str(DIGITS / "cnn.onnx"))
    model.graph.input.append(onnx.helper.make_tensor_value_info("gain", onnx.TensorProto.FLOAT, []))
    model.graph.node[0].input[0] = "scaled"
    model.graph.node.insert(0, onnx.helper.make_node("Mul", ["input", "gain"], ["scaled"]))
    source = save(model, tmp_path)
    with np.load(DIGITS / "calib.npz") as calib:
        x = calib["input"][:64]
    gains = np.random.default_rng(0).uniform(0.8, 1.2, len(x)).astype(np.float32)
    np.savez(tmp_path / "calib.npz", input=x, gain=gains)
    report = quantize_model(source, tmp_path / "q.onnx", tmp_path / "calib.npz")
    assert any(d.quantized for d in report.decisions if d.op_type == "Conv")
    feed = {"input": x[:8], "gain": np.array(1.1, np.float32)}
    assert sqnr_db(run(source, feed)[0], run(tmp_path / "q.onnx", feed)[0]) > 35


def test_the_report_says_what_the_quantization_cost_in_output_sqnr(tmp_path):
    out, report = quantize_cnn(tmp_path)
    with np.load(DIGITS / "calib.npz") as calib:
        x = calib["input"][:16]  # the report measures on the first 16 calibration samples
    want = sqnr_db(run(DIGITS / "cnn.onnx", {"input": x})[0], run(out, {"input": x})[0])
    assert report.output_sqnr == {"logits": pytest.approx(want, abs=1e-6)}
    assert f"'logits' {want:.2f} dB" in report.summary(out)
    assert "warning" not in report.summary(out)
    # Unusable: the report must say so (every layer int8: --prefer balanced keeps the ends
    # float at no measurable cost on this tiny model, and reaches 12 dB).
    out, report = quantize_cnn(tmp_path, weight_bits=2, prefer="speed")
    assert report.output_sqnr["logits"] < 10
    assert "warning: an output SQNR under 10 dB" in report.summary(out)


def test_exclude_keeps_named_nodes_and_op_types_in_float(tmp_path):
    out = tmp_path / "q.onnx"
    config = QuantConfig(exclude=("/12/Gemm", "GlobalAveragePool"))
    report = quantize_model(DIGITS / "cnn.onnx", out, DIGITS / "calib.npz", config)
    kept = {d.node for d in report.kept_float}
    assert {"/12/Gemm", "/10/GlobalAveragePool"} <= kept
    fused = op_counts(ort_rewrite(onnx.load(str(out)), FUSED))
    assert fused["Gemm"] == 1


def test_inspect_says_why_each_float_node_stays_float(tmp_path):
    source = save(models.conv_net(middle="Tanh"), tmp_path)
    decisions = {d.node: d for d in inspect_model(source)}
    assert decisions["conv1"].quantized
    assert not decisions["middle"].quantized
    assert "Tanh" in decisions["middle"].reason


def test_inspect_of_a_model_whose_nodes_preparation_folds_away(tmp_path, capsys):
    """Its output a Constant's: no node is left to list (an internal error before)."""
    from onnx import helper, numpy_helper

    from qdq.cli import main

    value = numpy_helper.from_array(np.ones((2, 4), np.float32))
    node = helper.make_node("Constant", [], ["y"], name="k", value=value)
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 4])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)
    source = save(helper.make_model(helper.make_graph([node], "constant", [x], [y])), tmp_path)
    assert main(["inspect", str(source)]) == 0
    assert "0 of 0 nodes quantizable" in capsys.readouterr().out


def test_metadata_maps_float_tensors_to_their_quantized_copies(tmp_path):
    out = tmp_path / "q.onnx"
    quantize_model(DIGITS / "cnn.onnx", out, DIGITS / "calib.npz")
    props = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    copies = json.loads(props["qdq.quantized_tensors"])
    assert copies["input"] == "input_dq"
    assert "logits" not in copies  # the last Gemm outputs float: nothing reads it as int8


def test_a_quantized_graph_output_keeps_its_name(tmp_path):
    # ConvTranspose has no float-output int8 kernel: its output (through the Relu) is quantized,
    # and the dequantized copy carries the graph output's name.
    source = save(models.conv_transpose_net(), tmp_path)
    x = np.random.default_rng(5).standard_normal((8, 4, 4, 4)).astype(np.float32)
    out, _ = quantize_on(source, x, tmp_path)
    model = onnx.load(str(out))
    props = {p.key: p.value for p in model.metadata_props}
    assert json.loads(props["qdq.quantized_tensors"])["y"] == "y"
    assert next(n for n in model.graph.node if n.output[0] == "y").op_type == "DequantizeLinear"
