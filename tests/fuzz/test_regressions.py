"""Each defect found by trying qdq as a hostile user would, as a named case: the command's exit
code and one line, nothing written, no temporary file left, the inputs untouched."""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

import numpy as np
import onnx
import pytest
from hostile import (
    Workspace,
    X,
    custom_op_model,
    model_with,
    no_input_model,
    npy_bytes,
    npz_bytes,
    png_header,
    quantize,
    refused,
    run_contract,
    save,
    sequence_input_model,
    write,
)
from onnx import numpy_helper
from PIL import Image

import models


@pytest.fixture
def ws(tmp_path: Path) -> Workspace:
    return Workspace(tmp_path)


@pytest.fixture
def quantized(ws: Workspace) -> Path:
    out = ws.folder / "q.onnx"
    assert ws.run("quantize", ws.model, "-o", out, "--calib", ws.calib).code == 0
    return out


# --- 1. inputs destroyed ----------------------------------------------------------------------


def test_run_refuses_an_output_that_is_its_model(ws, quantized):
    args = ["run", quantized, "--inputs", ws.calib, "-o", quantized]
    refused(ws, args, "is the input", quantized)


def test_run_refuses_an_output_that_is_its_inputs(ws, quantized):
    refused(ws, ["run", quantized, "--inputs", ws.calib, "-o", ws.calib], "is the input", ws.calib)


def test_quantize_refuses_an_output_that_is_its_calibration_data(ws):
    refused(ws, ["quantize", ws.model, "-o", ws.calib, "--calib", ws.calib], "is the input")


def test_quantize_refuses_an_output_that_holds_the_models_external_weights(ws):
    """The weights of a model saved with external data are an input too (they had been
    overwritten, exit 0)."""
    model = ws.folder / "external.onnx"
    onnx.save(onnx.load(ws.model), model, save_as_external_data=True, location="w.bin",
              size_threshold=0)  # fmt: skip
    args = ["quantize", model, "-o", ws.folder / "w.bin", "--calib", ws.calib]
    result = run_contract(ws, args, None, codes=(2,))  # None: w.bin must stay as it was too
    assert "holds the weights of the input model" in result.stderr, result.stderr


@pytest.mark.parametrize("link", [os.link, os.symlink])
def test_an_output_linked_to_the_model_is_refused(ws, link):
    linked = ws.folder / "linked.onnx"
    link(ws.model, linked)
    refused(ws, ["quantize", ws.model, "-o", linked, "--calib", ws.calib], "is the input", linked)


def test_an_output_that_is_a_fifo_or_device_is_refused_and_left_alone(ws):
    fifo = ws.folder / "fifo"
    os.mkfifo(fifo)
    refused(ws, ["quantize", ws.model, "-o", fifo, "--calib", ws.calib], "not a regular file")
    assert stat.S_ISFIFO(fifo.stat().st_mode)
    device = ws.folder / "null"
    try:
        os.mknod(device, stat.S_IFCHR | 0o666, os.makedev(1, 3))
    except OSError:
        return  # no permission to make devices here
    refused(ws, ["quantize", ws.model, "-o", device, "--calib", ws.calib], "not a regular file")
    assert stat.S_ISCHR(device.stat().st_mode)


@pytest.mark.parametrize(
    ("output", "words"),
    [("", "-o is empty"), ("newdir/", "ends in a separator"), (".", "is a folder")],
)
def test_an_output_that_names_no_file_is_refused_before_any_work(ws, output, words):
    target = str(ws.folder / output) if output else ""
    if output == "newdir/":
        target = str(ws.folder / "newdir") + os.sep
    refused(ws, ["quantize", ws.model, "-o", target, "--calib", ws.calib], words)
    assert not (ws.folder / "newdir").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes in read-only folders")
def test_an_output_in_a_read_only_folder_is_refused_before_any_work(ws):
    locked = ws.folder / "locked"
    locked.mkdir(mode=0o555)
    refused(
        ws, ["quantize", ws.model, "-o", locked / "q.onnx", "--calib", ws.calib], "cannot write"
    )


def test_run_writes_its_output_with_the_usual_mode(ws, quantized):
    old = os.umask(0o022)
    try:
        assert ws.run("run", quantized, "--inputs", ws.calib, "-o", ws.folder / "y.npz").code == 0
    finally:
        os.umask(old)
    assert stat.S_IMODE((ws.folder / "y.npz").stat().st_mode) == 0o644


# --- 2. tracebacks instead of exit 2 ------------------------------------------------------------


def test_an_npz_with_a_bad_crc_is_refused(ws):
    data = bytearray(ws.calib.read_bytes())
    data[-300] ^= 0xFF  # inside the array's bytes, before the central directory
    refused(ws, quantize(ws, write(ws.folder / "crc.npz", bytes(data))), "Bad CRC-32")


@pytest.mark.parametrize("keep", [0, 100, 0.5])
def test_an_empty_or_truncated_npz_is_refused(ws, keep):
    data = ws.calib.read_bytes()
    cut = data[: int(len(data) * keep) if isinstance(keep, float) else keep]
    refused(ws, quantize(ws, write(ws.folder / "cut.npz", cut)), "not a readable .npz")


def test_an_npz_whose_header_claims_more_samples_than_it_holds_is_refused(ws):
    lie = npz_bytes({"x": npy_bytes(X, claimed_shape=(100, 3, 8, 8))})
    refused(ws, quantize(ws, write(ws.folder / "lie.npz", lie)), "truncated or corrupt")


def test_an_npy_named_npz_and_the_reverse_are_refused_with_the_fix(ws):
    np.save(ws.folder / "x.npy", X)
    shutil.copy(ws.folder / "x.npy", ws.folder / "x_npy.npz")
    shutil.copy(ws.calib, ws.folder / "calib_npz.npy")
    refused(ws, quantize(ws, ws.folder / "x_npy.npz"), "rename it to .npy")
    refused(ws, quantize(ws, ws.folder / "calib_npz.npy"), "rename it to .npz")


def test_an_npz_holding_an_object_array_is_refused_without_unpickling(ws):
    np.savez(ws.folder / "obj.npz", x=np.array([{"a": 1}, 2], dtype=object))
    refused(ws, quantize(ws, ws.folder / "obj.npz"), "never unpickles")


def test_a_model_with_no_inputs_is_refused(ws):
    save(no_input_model(), ws.model)
    refused(ws, quantize(ws), "no inputs")


def test_a_sequence_typed_input_is_refused(ws):
    save(sequence_input_model(), ws.model)
    refused(ws, quantize(ws), "numeric tensors only")


def test_external_data_whose_length_passes_the_files_end_is_refused(ws):
    model = models.conv_net()
    weight = next(t for t in model.graph.initializer if t.name == "w2")
    array = numpy_helper.to_array(weight)
    (ws.folder / "w2.bin").write_bytes(array.tobytes()[:-8])  # 8 bytes short
    weight.ClearField("raw_data")
    weight.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", "w2.bin"), ("offset", "0"), ("length", str(array.nbytes))):
        weight.external_data.add(key=key, value=value)
    save(model, ws.model)
    refused(ws, quantize(ws), "truncated")


def test_token_ids_outside_the_vocabulary_are_said_to_be_bad_data_everywhere(ws):
    """ONNX Runtime's own error on the user's data had been an internal error (exit 1) in
    quantize, compare and run: it is the data's, exit 2, with ONNX Runtime's reason."""
    table = numpy_helper.from_array(np.random.default_rng(3).normal(size=(100, 8)).astype(
        np.float32), "table")  # fmt: skip
    node = onnx.helper.make_node("Gather", ["table", "ids"], ["y"], name="gather")
    ids = onnx.helper.make_tensor_value_info("ids", onnx.TensorProto.INT64, ["N", 5])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 5, 8])
    save(model_with([node], [ids], [y], [table]), ws.model)
    np.savez(ws.calib, ids=np.random.default_rng(4).integers(0, 100, (16, 5)))
    quantized = ws.folder / "q.onnx"
    assert ws.run("quantize", ws.model, "-o", quantized, "--calib", ws.calib).code == 0
    bad = ws.folder / "bad.npz"
    np.savez(bad, ids=np.full((4, 5), 1000, np.int64))
    words = "fails in ONNX Runtime (node 'gather' (Gather): indices element out of data bounds"
    refused(ws, ["quantize", ws.model, "-o", ws.folder / "out.onnx", "--calib", bad], words)
    refused(ws, ["compare", ws.model, quantized, "--data", bad], words)
    for engine in ("integer", "ort"):
        args = ["run", quantized, "--inputs", bad, "-o", ws.folder / "y.npz", "--engine", engine]
        refused(ws, args, words, ws.folder / "y.npz")


def test_compare_refuses_a_quantized_model_without_the_float_models_outputs(ws, quantized):
    other = onnx.load(ws.model)
    old = other.graph.output[0].name
    for node in other.graph.node:
        node.output[:] = ["z" if name == old else name for name in node.output]
    other.graph.output[0].name = "z"
    float_path = save(other, ws.folder / "other.onnx")
    refused(
        ws,
        ["compare", float_path, quantized, "--data", ws.calib],
        "lacks the float model's outputs ['z']",
        None,
    )


def test_tables_refuse_a_qoperator_file_forged_metadata_and_a_binary_param(ws, quantized):
    """Each had been an internal error (KeyError, AttributeError, UnicodeDecodeError)."""
    table = ws.folder / "t.table"
    qop = ws.folder / "qop.onnx"
    args = ["quantize", ws.model, "-o", qop, "--calib", ws.calib, "--format", "qoperator"]
    refused(ws, [*args, "--table", f"ncnn:{table}"], "drop --format qoperator", qop)
    assert ws.run(*args).code == 0
    export = ["export-table", qop, "--format", "tensorrt", "-o", table]
    refused(ws, export, "does not match its Q/DQ pairs", table)
    forged = onnx.load(quantized)
    forged.metadata_props[0].value = "[1, 2]"
    export[1] = save(forged, ws.folder / "forged.onnx")
    refused(ws, export, "does not match its Q/DQ pairs", table)
    param = write(ws.folder / "p.param", bytes([0xFF, 0xA8]) * 50)
    args = ["export-table", quantized, "--format", "ncnn", "-o", table, "--ncnn-param", param]
    refused(ws, args, "is not a text ncnn .param file", table)


def test_the_api_refuses_exclude_names_the_model_lacks_and_a_batch_size_below_one(ws):
    """As the CLI does; the API had quantized every layer without a word."""
    from qdq.config import QuantConfig
    from qdq.errors import DataError, UsageError
    from qdq.pipeline import quantize_model
    from qdq.report.compare import compare_models

    out = ws.folder / "out.onnx"
    with pytest.raises(UsageError, match="names no node or op type"):
        quantize_model(ws.model, out, ws.calib, QuantConfig(exclude=("nosuch",)))
    assert not out.exists()
    with pytest.raises(DataError, match="batch_size"):
        compare_models(ws.model, ws.model, ws.calib, batch_size=0)


def test_a_model_importing_the_default_domain_twice_is_refused(ws):
    model = onnx.load(ws.model)
    model.opset_import.append(onnx.helper.make_opsetid("", 11))
    save(model, ws.model)
    refused(ws, quantize(ws), "more than once")


def test_external_weights_named_by_an_absolute_path_are_refused(ws):
    model = onnx.load(ws.model)
    onnx.save(model, ws.model, save_as_external_data=True, location="w.bin", size_threshold=0)
    model = onnx.load(ws.model, load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = str(ws.folder / "w.bin")  # inside the folder, but absolute
    save(model, ws.model)
    refused(ws, quantize(ws), "an absolute path or one outside the model's folder")


def test_report_and_table_in_one_file_are_refused(ws):
    same = ws.folder / "same.out"
    args = [*quantize(ws), "--report", same, "--table", f"tensorrt:{same}"]
    refused(ws, args, "is the --table file")
    assert not same.exists()


def test_finetune_of_a_model_with_nothing_to_learn_is_refused(ws):
    relu = onnx.helper.make_node("Relu", ["x"], ["y"], name="relu")
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 3, 8, 8])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 3, 8, 8])
    save(model_with([relu], [x], [y]), ws.model)
    args = ["finetune", ws.model, "-o", ws.folder / "ft.onnx", "--calib", ws.calib, "--steps", "2"]
    refused(ws, args, "nothing to change", ws.folder / "ft.onnx")


@pytest.mark.parametrize("engine", ["integer", "ort"])
def test_run_refuses_a_custom_domain_op(ws, engine):
    save(custom_op_model(), ws.model)
    np.savez(ws.folder / "x.npz", x=np.ones((2, 4), np.float32))
    args = ["run", ws.model, "--inputs", ws.folder / "x.npz", "-o", ws.folder / "y.npz"]
    refused(ws, [*args, "--engine", engine], "ONNX Runtime cannot load it", ws.folder / "y.npz")


@pytest.mark.parametrize("side", [20000, 12000])
def test_a_decompression_bomb_png_is_refused_with_the_pixel_limit(ws, side):
    (ws.folder / "images").mkdir()
    write(ws.folder / "images" / "bomb.png", png_header(side, side))
    refused(ws, quantize(ws, ws.folder / "images"), "limit of 50 megapixels")


def test_an_image_size_other_than_the_inputs_fixed_one_is_refused_before_resizing(ws):
    """30000 x 30000 had been resized to first (22 GB, killed), then refused."""
    (ws.folder / "images").mkdir()
    Image.new("RGB", (12, 10)).save(ws.folder / "images" / "a.png")
    args = [*quantize(ws, ws.folder / "images"), "--image-size", "30000", "30000"]
    refused(ws, args, "differs from the input's fixed (8, 8)")


@pytest.mark.parametrize(
    ("flags", "words"),
    [
        (["--seed", "-1"], "--seed: must be an integer >= 0"),
        (["--image-size", "0", "0"], "--image-size: must be an integer >= 1"),
        (["--max-samples", "0"], "--max-samples: must be an integer >= 1"),
        (["--batch-size", "-3"], "--batch-size: must be an integer >= 1"),
        (["--target-sqnr", "nan"], "--target-sqnr: must be a finite number"),
        (["--value-scale", "nan"], "--value-scale: must be a finite number"),
        (["--input-range", "0", "1"], "--input-range only applies with --data-free"),
        (["--exclude", "conv3"], "did you mean conv2, conv1, Conv?"),
        (["--exclude", "NoSuchNode"], "names no node or op type"),
    ],
)
def test_meaningless_flags_are_refused_naming_the_flag(ws, flags, words):
    refused(ws, quantize(ws, None, *flags), words)


@pytest.mark.parametrize(
    ("flags", "words"),
    [
        (["--input-range", "nan", "1"], "--input-range: must be a finite number"),
        (["--input-range", "1", "0"], "needs LO < HI"),
    ],
)
def test_data_free_input_ranges_must_be_finite_and_ordered(ws, flags, words):
    refused(ws, quantize(ws, None, "--data-free", *flags), words)


def test_an_already_quantized_model_is_refused_unless_forced(ws, quantized):
    args = ["quantize", quantized, "-o", ws.folder / "again.onnx", "--calib", ws.calib]
    refused(ws, args, "already quantized", ws.folder / "again.onnx")
    assert run_contract(ws, [*args, "--force"], ws.folder / "again.onnx").code == 0
    tuned = ["finetune", quantized, "-o", ws.folder / "tuned.onnx", "--calib", ws.calib]
    result = run_contract(ws, tuned, ws.folder / "tuned.onnx", codes=(2,))
    assert "already quantized" in result.stderr
    assert "--force" not in result.stderr  # finetune has none to pass


def test_a_fifo_given_as_calibration_data_is_refused_not_read(ws):
    os.mkfifo(ws.folder / "calib_fifo.npz")
    refused(ws, quantize(ws, ws.folder / "calib_fifo.npz"), "not a regular file")


def test_usage_errors_are_one_line(ws):
    refused(ws, ["quantize", ws.model], "required: -o/--output", None)


def test_a_fifo_given_as_the_model_is_refused_not_read(ws):
    os.remove(ws.model)
    os.mkfifo(ws.model)
    refused(ws, quantize(ws), "is not a file")


def test_a_model_whose_names_are_not_utf8_is_refused(ws):
    data = bytearray(ws.model.read_bytes())
    data[9] ^= 0xFF  # inside the first node's first input name: now invalid UTF-8
    write(ws.model, bytes(data))
    refused(ws, quantize(ws), "is not a valid ONNX model")


def test_a_model_input_with_an_axis_fixed_at_zero_is_refused(ws):
    model = onnx.load(str(ws.model))
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 0
    save(model, ws.model)
    refused(ws, quantize(ws), "axis of size 0")


def test_an_npy_header_that_does_not_parse_is_refused(ws):
    header = b"{'descr': '<f4', 'fortran_order': False, 'shape': (), }".ljust(117) + b"\n"
    data = b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header + bytes(4)
    write(ws.folder / "x.npy", data.replace(b"}", b"(", 1))  # an unclosed bracket
    refused(ws, quantize(ws, ws.folder / "x.npy"), "not a readable .npy")


def test_a_model_at_an_opset_without_ort_quantize_linear_is_refused(ws):
    model = onnx.load(str(ws.model))
    model.opset_import[0].version = onnx.defs.onnx_opset_version()
    save(model, ws.model)
    result = run_contract(ws, quantize(ws), ws.folder / "out.onnx")
    assert result.code == 0 or "has no QuantizeLinear" in result.stderr


def test_inspect_refuses_a_node_name_in_broken_utf8(ws):
    data = bytearray(ws.model.read_bytes())
    data[data.index(b"conv1") + 1] = 0xFF
    write(ws.model, bytes(data))
    refused(ws, ["inspect", ws.model], "broken UTF-8", None)
