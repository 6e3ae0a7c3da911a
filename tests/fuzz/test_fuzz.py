"""Generated hostile input for every command: corrupt and meaningless .npz/.npy data, broken
models, image folders and flag combinations. Each case keeps the contract (`run_contract`):
exit 0 or 2, one line on failure, no traceback, no leftovers, inputs byte-identical.

About 250 cases by default; QDQ_FUZZ_EXAMPLES=5000 runs that many in all.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from hostile import MODEL_BYTES, Workspace, X, npy_bytes, npz_bytes, png_header, run_contract
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

pytestmark = pytest.mark.slow  # end-to-end: `pytest -m "not slow"` skips it

DEFAULT_TOTAL = 250
SCALE = int(os.environ.get("QDQ_FUZZ_EXAMPLES", DEFAULT_TOTAL)) / DEFAULT_TOTAL


def fuzz(examples: int):
    """Hypothesis settings for `examples` cases (scaled by QDQ_FUZZ_EXAMPLES), reproducible."""
    return settings(
        max_examples=max(1, round(examples * SCALE)),
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )


def workspace() -> tempfile.TemporaryDirectory:
    return tempfile.TemporaryDirectory(prefix="qdq-fuzz-")


# --- strategies ---------------------------------------------------------------------------------

DTYPES = ["float32", "float64", "float16", "int8", "int64", "uint8", "bool", "complex64", "U3"]
SHAPES = st.lists(st.integers(0, 9), min_size=0, max_size=5).map(tuple)
SPECIAL = st.sampled_from([0.0, np.nan, np.inf, -np.inf, 1e30, -1e-30])


@st.composite
def arrays(draw: st.DrawFn) -> np.ndarray:
    """Arrays of any dtype and shape, now and then the right one, with NaN, Inf or extremes."""
    shape = (draw(st.integers(0, 9)), 3, 8, 8) if draw(st.booleans()) else draw(SHAPES)
    dtype = np.dtype(draw(st.sampled_from(DTYPES)))
    array = np.zeros(shape, dtype)
    if array.size and dtype.kind in "fc" and draw(st.booleans()):
        array.flat[draw(st.integers(0, array.size - 1))] = draw(SPECIAL)
    return array


def mutate(data: bytes, draw: st.DrawFn) -> bytes:
    """`data` truncated, with bytes flipped, or with junk inserted."""
    how = draw(st.sampled_from(["truncate", "flip", "insert", "keep"]))
    if how == "truncate":
        return data[: draw(st.integers(0, len(data)))]
    if how == "keep":
        return data
    at = draw(st.integers(0, len(data) - 1))
    junk = draw(st.binary(min_size=1, max_size=16))
    if how == "flip":
        return data[:at] + bytes(b ^ 0xFF for b in junk[:1]) + data[at + 1 :]
    return data[:at] + junk + data[at:]


@st.composite
def npz_files(draw: st.DrawFn) -> tuple[str, bytes]:
    """(file name, bytes): .npz and .npy files, valid or subtly not."""
    kind = draw(st.sampled_from(["npz", "npy", "lie", "objects", "swapped"]))
    array = draw(arrays())
    if kind == "lie":  # a header claiming another shape than the bytes hold
        claimed = draw(SHAPES)
        members = {"x": npy_bytes(np.ascontiguousarray(X), claimed)}
        return "calib.npz", npz_bytes(members, draw(st.booleans()))
    if kind == "objects":
        stream = io.BytesIO()
        np.savez(stream, x=np.array([1, "a", None], dtype=object))
        return "calib.npz", stream.getvalue()
    stream = io.BytesIO()
    if kind == "npy":
        np.save(stream, array)
        data = stream.getvalue()
    else:
        names = draw(st.sampled_from([["x"], ["y"], ["x", "label"], ["x", "y"]]))
        compressed = draw(st.booleans())
        (np.savez_compressed if compressed else np.savez)(stream, **dict.fromkeys(names, array))
        data = stream.getvalue()
    suffix = {"npz": ".npz", "npy": ".npy", "swapped": ".npy"}[kind]
    return "calib" + suffix, mutate(data, draw) if draw(st.booleans()) else data


@st.composite
def hostile_models(draw: st.DrawFn) -> bytes:
    """The workspace's model with its bytes broken or one field of its graph made hostile."""
    if draw(st.booleans()):
        return mutate(MODEL_BYTES, draw)
    model = onnx.load_from_string(MODEL_BYTES)
    graph = model.graph
    change = draw(
        st.sampled_from(["elem_type", "dims", "no_input", "opset", "node", "drop_init", "sequence"])
    )
    value = graph.input[0].type
    if change == "elem_type":
        value.tensor_type.elem_type = draw(st.integers(0, 25))
    elif change == "dims":
        dims = value.tensor_type.shape.dim
        dims[draw(st.integers(0, 3))].dim_value = draw(st.sampled_from([0, 1, 2, 7, 10**9]))
    elif change == "no_input":
        del graph.input[:]
    elif change == "opset":
        model.opset_import[0].version = draw(st.integers(1, 30))
    elif change == "node":
        node = graph.node[draw(st.integers(0, len(graph.node) - 1))]
        node.op_type = draw(st.sampled_from(["Mystery", "QuantizeLinear", "Conv", "Identity"]))
        node.domain = draw(st.sampled_from(["", "example.custom", "com.microsoft"]))
    elif change == "drop_init":
        del graph.initializer[draw(st.integers(0, len(graph.initializer) - 1))]
    else:
        value.sequence_type.elem_type.tensor_type.elem_type = onnx.TensorProto.FLOAT
    return model.SerializeToString()


NUMBERS = st.sampled_from(["0", "1", "-1", "3", "nan", "inf", "-inf", "1e40", "x", "", "8"])
FLAGS = {
    "--method": st.sampled_from(["minmax", "ema", "kl", "percentile", "mse", "nope"]),
    "--weight-bits": NUMBERS,
    "--activation-dtype": st.sampled_from(["uint8", "int8", "int4"]),
    "--format": st.sampled_from(["qdq", "qoperator", "onnx"]),
    "--preset": st.sampled_from(["default", "tensorrt", "fast"]),
    "--target-sqnr": NUMBERS,
    "--batch-size": NUMBERS,
    "--max-samples": NUMBERS,
    "--seed": NUMBERS,
    "--exclude": st.sampled_from(["conv1", "Conv", "conv9", "relu1 Gemm", "Relu"]),
    "--input-range": st.sampled_from(["0 1", "nan 1", "1 0", "-1 1", "0 0"]),
    "--image-size": st.sampled_from(["8 8", "0 0", "-1 4", "4"]),
    "--mean": st.sampled_from(["0", "0.5 0.5", "0 0 0", "nan"]),
    "--std": st.sampled_from(["1", "0", "1 1 1", "inf"]),
    "--value-scale": NUMBERS,
    "--layout": st.sampled_from(["NCHW", "NHWC", "CHW"]),
}
SWITCHES = ["--per-tensor", "--per-channel", "--equalize", "--no-smoothing", "--data-free",
            "--no-sequential-bias-correction", "--force", "--bogus"]  # fmt: skip


@st.composite
def flag_sets(draw: st.DrawFn) -> list[str]:
    chosen = draw(st.lists(st.sampled_from(sorted(FLAGS)), max_size=4, unique=True))
    args = []
    for flag in chosen:
        args += [flag, *draw(FLAGS[flag]).split()]
    return args + draw(st.lists(st.sampled_from(SWITCHES), max_size=2, unique=True))


@st.composite
def image_folders(draw: st.DrawFn) -> list[tuple[str, bytes]]:
    """Files for an image folder: real pictures of any mode and size, junk, huge headers."""
    files = []
    for i in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["picture", "picture", "junk", "bomb"]))
        if kind == "picture":
            mode = draw(st.sampled_from(["RGB", "L", "RGBA", "P", "1", "I;16", "CMYK"]))
            size = (draw(st.integers(1, 40)), draw(st.integers(1, 40)))
            fmt = draw(st.sampled_from(["PNG", "JPEG", "BMP", "TIFF"]))
            stream = io.BytesIO()
            try:
                Image.new(mode, size).save(stream, fmt)
            except (OSError, ValueError, KeyError):  # a mode the format cannot hold
                Image.new("RGB", size).save(stream, "PNG")
            data = stream.getvalue()
            files.append(
                (f"{i}.{fmt.lower()}", mutate(data, draw) if draw(st.booleans()) else data)
            )
        elif kind == "junk":
            files.append((f"{i}.png", draw(st.binary(max_size=64))))
        else:
            side = draw(st.sampled_from([8000, 12000, 30000]))
            files.append((f"{i}.png", png_header(side, side)))
    return files


# --- the cases ----------------------------------------------------------------------------------


@fuzz(70)
@given(npz_files(), st.lists(st.sampled_from(["--max-samples 2", "--seed 3"]), unique=True))
def test_hostile_calibration_files_keep_the_contract(file, extra):
    name, data = file
    with workspace() as folder:
        ws = Workspace(Path(folder))
        calib = ws.folder / name
        calib.write_bytes(data)
        out = ws.folder / "out.onnx"
        flags = " ".join(extra).split()
        run_contract(ws, ["quantize", ws.model, "-o", out, "--calib", calib, *flags], out)


@fuzz(50)
@given(hostile_models())
def test_hostile_models_keep_the_contract(data):
    with workspace() as folder:
        ws = Workspace(Path(folder))
        ws.model.write_bytes(data)
        out = ws.folder / "out.onnx"
        run_contract(ws, ["quantize", ws.model, "-o", out, "--calib", ws.calib], out)
        run_contract(ws, ["inspect", ws.model], None)


@fuzz(60)
@given(flag_sets(), st.sampled_from(["out.onnx", "", "sub/", "model.onnx", "calib.npz", "."]))
def test_flag_combinations_keep_the_contract(flags, output):
    with workspace() as folder:
        ws = Workspace(Path(folder))
        out = str(ws.folder / output) + (os.sep if output.endswith("/") else "") if output else ""
        calib = [] if "--data-free" in flags else ["--calib", ws.calib]
        target = Path(out) if output not in ("", ".", "sub/") else None
        run_contract(ws, ["quantize", ws.model, "-o", out, *calib, *flags], target)


@fuzz(30)
@given(image_folders(), flag_sets())
def test_hostile_image_folders_keep_the_contract(files, flags):
    with workspace() as folder:
        ws = Workspace(Path(folder))
        images = ws.folder / "images"
        images.mkdir()
        for name, data in files:
            (images / name).write_bytes(data)
        flags = [f for f in flags if f != "--data-free"]
        out = ws.folder / "out.onnx"
        run_contract(ws, ["quantize", ws.model, "-o", out, "--calib", images, *flags], out)


@fuzz(30)
@given(npz_files(), st.sampled_from(["integer", "ort"]), st.booleans())
def test_run_and_compare_with_hostile_data_keep_the_contract(file, engine, compare):
    name, data = file
    with workspace() as folder:
        ws = Workspace(Path(folder))
        given_data = ws.folder / name
        given_data.write_bytes(data)
        if compare:
            args = ["compare", ws.model, ws.model, "--data", given_data, "--latency-runs", "0"]
            run_contract(ws, args, None)
        else:
            out = ws.folder / "y.npz"
            args = ["run", ws.model, "--inputs", given_data, "-o", out, "--engine", engine]
            run_contract(ws, args, out)


@fuzz(10)
@given(flag_sets())
def test_the_installed_command_keeps_the_contract_in_a_process(flags):
    with workspace() as folder:
        ws = Workspace(Path(folder))
        out = ws.folder / "out.onnx"
        calib = [] if "--data-free" in flags else ["--calib", str(ws.calib)]
        before = ws.digests()
        done = subprocess.run(
            [sys.executable, "-m", "qdq.cli", "quantize", str(ws.model), "-o", str(out),
             *calib, *flags],
            capture_output=True, text=True, env={**os.environ, "TMPDIR": str(ws.temp)},
        )  # fmt: skip
        assert done.returncode in (0, 2), done.stderr
        assert "Traceback" not in done.stderr
        if done.returncode:
            assert done.stderr.count("\n") == 1, done.stderr
            assert not out.exists()
        assert {p: d for p, d in ws.digests().items() if p != out and p.parent != ws.temp} == {
            p: d for p, d in before.items()
        }
        assert [p.name for p in ws.temp.iterdir()] in ([], [".ses"])  # onnxruntime's own
