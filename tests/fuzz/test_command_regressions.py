"""Defects of finetune, run, diff, export-table, the integer engine and the image options that
the third and fourth hostile sweeps found (2026-12-05), each as a named case that failed on the
code before its fix; the contract as in test_regressions.py."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hostile import Workspace, X, matmul_model, model_with, quantize, refused, run_contract, save
from onnx import numpy_helper


@pytest.fixture
def ws(tmp_path: Path) -> Workspace:
    return Workspace(tmp_path)


@pytest.fixture
def quantized(ws: Workspace) -> Path:
    out = ws.folder / "q.onnx"
    assert ws.run("quantize", ws.model, "-o", out, "--calib", ws.calib).code == 0
    return out


def test_finetune_refuses_a_rate_past_the_whole_grid(ws):
    """--lr 1e40 overflowed float32 inside torch's Adam (exit 1)."""
    out = ws.folder / "ft.onnx"
    args = ["finetune", ws.model, "-o", out, "--calib", ws.calib, "--steps", "2", "--lr", "1e40"]
    refused(ws, args, "--lr must be in (0, 256]", out)


def test_quantize_prints_no_numpy_warning_on_inputs_near_1e30(ws):
    """GPTQ's H overflowed with raw numpy warnings on stderr; the layer keeps nearest rounding."""
    np.savez(ws.calib, x=np.sign(X) * np.float32(1e30))
    with warnings.catch_warnings(record=True) as caught:  # pytest would catch them first
        warnings.simplefilter("always")
        run_contract(ws, quantize(ws, None, "--method", "minmax"), None, codes=(0,))
    assert not [w for w in caught if issubclass(w.category, RuntimeWarning)]


def test_the_engine_runs_a_1d_convolution_at_16_and_32_bits(ws):
    """It refused one without pads at both widths ("convolves 2-D images", stop 49's sweep)
    and ended in an internal error on one with pads (stop 68's): now the 2-D convolution of
    height 1 it is, at either accumulator width."""
    w = numpy_helper.from_array(np.random.default_rng(14).random((4, 3, 3), np.float32), "w")
    node = onnx.helper.make_node("Conv", ["x", "w"], ["y"], name="conv", pads=[1, 0])
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 3, 16])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 4, 15])
    save(model_with([node], [x], [y], [w]), ws.model)
    np.savez(ws.calib, x=np.random.default_rng(15).random((32, 3, 16), np.float32))
    quantized = ws.folder / "q.onnx"
    assert ws.run("quantize", ws.model, "-o", quantized, "--calib", ws.calib).code == 0
    with np.load(ws.calib) as calib:
        want = ort.InferenceSession(quantized).run(None, {"x": calib["x"]})[0]
    for bits in ("16", "32"):
        out = ws.folder / f"y{bits}.npz"
        args = ["run", quantized, "--inputs", ws.calib, "-o", out, "--accumulator-bits", bits]
        run_contract(ws, args, out, codes=(0,))
        with np.load(out) as got:
            assert got["y"].shape == want.shape
            if bits == "32":  # 16 bits overflow here (9 terms of up to 255 x 127), as simulated
                np.testing.assert_allclose(got["y"], want, atol=0.02 * np.abs(want).max())


@pytest.mark.parametrize(
    ("lines", "words"),
    [
        ("Convolution c0 1 1 input a 0=abc\n", "channel count of 'abc'"),
        ("Convolution\n", "names no layer"),
    ],
)
def test_export_table_names_the_broken_line_of_an_ncnn_param(ws, quantized, lines, words):
    param = ws.folder / "m.param"
    param.write_text(f"7767517\n2 2\nInput input 0 1 input\n{lines}")
    table = ws.folder / "t.table"
    args = ["export-table", quantized, "--format", "ncnn", "-o", table, "--ncnn-param", param]
    refused(ws, args, words, table)


@pytest.mark.parametrize("kind", ["fifo", "folder"])
def test_export_table_refuses_an_ncnn_param_that_is_no_file(ws, quantized, kind):
    """A FIFO had blocked the command, and a folder failed as a bare "Is a directory"."""
    param = ws.folder / "m.param"
    os.mkfifo(param) if kind == "fifo" else param.mkdir()
    table = ws.folder / "t.table"
    args = ["export-table", quantized, "--format", "ncnn", "-o", table, "--ncnn-param", param]
    refused(ws, args, "not a regular file", table)


def test_no_ncnn_table_for_weights_ncnn_cannot_hold(ws):
    """ncnn quantizes its float weights to 8 bits itself: the table of a binary or 4-bit model
    gave it 8-bit scales of the wrong range (18x too wide at 4 bits), silently."""
    table = ws.folder / "t.table"
    for flags in (["--weight-grid", "binary"], ["--weight-bits", "4"]):
        refused(ws, quantize(ws, None, *flags, "--table", f"ncnn:{table}"), "no ncnn table")
    four = ws.folder / "four.onnx"
    made = ws.run("quantize", ws.model, "-o", four, "--calib", ws.calib, "--weight-bits", "4")
    assert made.code == 0
    args = ["export-table", four, "--format", "ncnn", "-o", table]
    refused(ws, args, "uniform 4-bit", table)
    tensorrt = ["export-table", four, "--format", "tensorrt", "-o", table]
    run_contract(ws, tensorrt, table, codes=(0,))


def test_finetune_per_tensor_keeps_one_scale_per_weight(ws):
    """A bias's int32 limit broadcast each per-tensor weight scale to one per channel, which
    the weight's codes could not divide by (exit 1 on every Conv model)."""
    out = ws.folder / "ft.onnx"
    args = ["finetune", ws.model, "-o", out, "--calib", ws.calib, "--steps", "2", "--per-tensor"]
    assert ws.run(*args).code == 0
    model = onnx.load(out)
    constants = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    scales = [
        constants[node.input[1]]
        for node in model.graph.node
        if node.op_type == "DequantizeLinear"
        and constants.get(node.input[0]) is not None
        and constants[node.input[0]].dtype == np.int8
    ]
    assert scales
    assert all(s.ndim == 0 for s in scales)


def test_image_options_beside_arrays_are_noted(ws):
    """--mean/--std/--image-size with an .npz did nothing, silently."""
    result = run_contract(ws, quantize(ws, None, "--mean", "100"), None, codes=(0,))
    assert "holds arrays, not pictures" in result.stdout


def test_two_specs_for_one_output_are_refused(ws):
    """The second was dropped without a word."""
    specs = ["--output-parts", "y:1:0-2,2-5", "y:1:0-1,1-5"]
    refused(ws, quantize(ws, None, *specs), "give one spec per output")


def test_run_names_its_archive_npz(ws, quantized):
    """`-o out.npy` held an .npz archive under a .npy name."""
    out = ws.folder / "out.npy"
    refused(ws, ["run", quantized, "--inputs", ws.calib, "-o", out], "name it .npz", out)


def test_export_table_refuses_an_ncnn_param_beside_a_tensorrt_table(ws, quantized):
    param = ws.folder / "m.param"
    param.write_text("7767517\n1 1\nInput input 0 1 input\n")
    table = ws.folder / "t.cache"
    args = ["export-table", quantized, "--format", "tensorrt", "-o", table, "--ncnn-param", param]
    refused(ws, args, "with --format ncnn only", table)


def test_diff_of_a_float_model_says_it_may_be_float(ws):
    args = ["diff", ws.model, "--data", ws.calib, "--against", "fp32"]
    refused(ws, args, "a float model, or QOperator form", None)


def test_a_forged_weight_grid_record_is_one_line(ws, quantized):
    """A `qdq.weights` value that is no GRID:BITS ended in an internal error (exit 1)."""
    model = onnx.load(quantized)
    for prop in model.metadata_props:
        if prop.key == "qdq.weights":
            prop.value = "int4"
    forged = save(model, ws.folder / "forged.onnx")
    table = ws.folder / "t.table"
    refused(ws, ["export-table", forged, "--format", "ncnn", "-o", table], "no GRID:BITS", table)


def test_the_engine_refuses_sequences_of_tensors_and_onnx_runtime_runs_them(ws):
    """A SplitToSequence / ConcatFromSequence pair (ONNX's backend test models): qdq quantizes
    it, and `qdq diff` and `qdq run` ended in an internal error ('list' has no dtype)."""
    model = matmul_model()
    model.graph.node.extend([
        onnx.helper.make_node("SplitToSequence", ["y"], ["parts"], axis=1, keepdims=1),
        onnx.helper.make_node("ConcatFromSequence", ["parts"], ["z"], axis=1),
    ])  # fmt: skip
    model.graph.output.append(onnx.helper.make_tensor_value_info("z", 1, ["N", 4]))
    save(model, ws.model)
    np.savez(ws.calib, x=np.random.default_rng(6).standard_normal((16, 4)).astype(np.float32))
    run_contract(ws, quantize(ws), ws.folder / "out.onnx", codes=(0,))
    np.savez(ws.folder / "one.npz", x=np.ones((2, 4), np.float32))
    quantized, data = ws.folder / "out.onnx", ws.folder / "one.npz"
    refused(ws, ["diff", quantized, "--data", data], "(SplitToSequence) makes or reads a sequence")
    ran = ws.folder / "ran.npz"
    refused(ws, ["run", quantized, "--inputs", data, "-o", ran], "--engine ort", ran)
    run_contract(ws, ["run", quantized, "--inputs", data, "-o", ran, "--engine", "ort"], ran)
    with np.load(ran) as got:
        assert got["z"].shape == (2, 4)


def test_diff_says_when_the_data_do_not_suit_the_model(ws):
    """Token ids past the table: ONNX Runtime's Gather fails on them, in the engine's float
    fallback first, and `qdq diff` ended in an internal error."""
    model = matmul_model()
    table = numpy_helper.from_array(np.ones((5, 4), np.float32), "table")
    model.graph.initializer.append(table)
    model.graph.input.append(onnx.helper.make_tensor_value_info("ids", 7, ["N"]))
    model.graph.node.extend([
        onnx.helper.make_node("Gather", ["table", "ids"], ["rows"], axis=0),
        onnx.helper.make_node("Add", ["y", "rows"], ["z"]),
    ])  # fmt: skip
    model.graph.output.append(onnx.helper.make_tensor_value_info("z", 1, ["N", 4]))
    save(model, ws.model)
    x = np.random.default_rng(7).standard_normal((16, 4)).astype(np.float32)
    np.savez(ws.calib, x=x, ids=np.arange(16) % 5)
    run_contract(ws, quantize(ws), ws.folder / "out.onnx", codes=(0,))
    np.savez(ws.folder / "bad.npz", x=x[:2], ids=np.array([1, 99]))
    command = ["diff", ws.folder / "out.onnx", "--data", ws.folder / "bad.npz"]
    refused(ws, command, "fails in ONNX Runtime (node")
