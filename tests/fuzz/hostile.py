"""Hostile inputs for the `qdq` command, and the contract every run of it must keep.

`Workspace` holds a small valid model and its data; the makers below write broken, hostile or
meaningless variants beside them; `run_contract` runs the command in-process and checks exit
code, one-line stderr, no traceback, no leftovers and inputs byte-identical.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import struct
import sys
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import models
from qdq.cli import main

X = np.random.default_rng(0).standard_normal((8, 3, 8, 8)).astype(np.float32)
MODEL_BYTES = models.conv_net().SerializeToString()


@dataclass
class Result:
    code: int
    stdout: str
    stderr: str


def cli(*args: object) -> Result:
    """`qdq ARGS` run in-process."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in args])
    return Result(code, out.getvalue(), err.getvalue())


class Workspace:
    """A folder with model.onnx (x[N,3,8,8] -> y[N,5]), calib.npz (8 samples) and a private
    temporary folder, so that leftovers anywhere can be found."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.temp = folder / "tmp"
        self.temp.mkdir()
        self.model = folder / "model.onnx"
        self.model.write_bytes(MODEL_BYTES)
        self.calib = folder / "calib.npz"
        np.savez(self.calib, x=X)

    def digests(self) -> dict[Path, str]:
        return {
            p: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in self.folder.rglob("*")
            if p.is_file() and not p.is_symlink()
        }

    def run(self, *args: object) -> Result:
        """`qdq ARGS` with tempfile's folder pointed at this workspace's private one."""
        previous = tempfile.tempdir
        tempfile.tempdir = str(self.temp)
        try:
            return cli(*args)
        finally:
            tempfile.tempdir = previous


def run_contract(ws: Workspace, args: list, output: Path | None, codes=(0, 2)) -> Result:
    """Run `qdq ARGS` in `ws` and check the contract: an allowed exit code; on exit 2 one line
    starting `qdq: error:`; never a traceback; on failure nothing written and no temporary
    files anywhere; inputs byte-identical whatever happened."""
    before = ws.digests()
    existed = output is not None and output.exists()
    result = ws.run(*args)
    assert result.code in codes, (args, result)
    assert "Traceback" not in result.stderr, result.stderr
    if result.code != 0:
        assert result.stderr.count("\n") == 1, result.stderr
        assert result.stderr.startswith("qdq: "), result.stderr
        if output is not None and not existed:
            assert not output.exists(), args
    after = ws.digests()
    changed = [p for p, digest in before.items() if after.get(p) != digest and p != output]
    assert not changed, (args, changed)
    leftovers = [p for p in ws.folder.rglob(".qdq-*")] + list(ws.temp.iterdir())
    assert not leftovers, leftovers
    return result


def quantize(ws: Workspace, calib: Path | None = None, *flags: object) -> list:
    calib_flags = ["--calib", calib or ws.calib] if "--data-free" not in flags else []
    return ["quantize", ws.model, "-o", ws.folder / "out.onnx", *calib_flags, *flags]


def refused(ws: Workspace, args: list, words: str, output: Path | None = None) -> None:
    result = run_contract(ws, args, output or ws.folder / "out.onnx", codes=(2,))
    assert result.stderr.startswith("qdq: error: ")
    assert words in result.stderr, result.stderr


# --- makers of hostile files ---------------------------------------------------------------


def npy_bytes(array: np.ndarray, claimed_shape: tuple | None = None) -> bytes:
    """An .npy file's bytes; `claimed_shape` overrides the header's shape (a lie)."""
    stream = io.BytesIO()
    header = np.lib.format.header_data_from_array_1_0(array)
    if claimed_shape is not None:
        header["shape"] = claimed_shape
    np.lib.format.write_array_header_1_0(stream, header)
    stream.write(np.ascontiguousarray(array).tobytes())
    return stream.getvalue()


def npz_bytes(members: dict[str, bytes], compressed: bool = False) -> bytes:
    """A zip of `members` (name -> .npy bytes) as numpy.savez writes it."""
    import zipfile

    stream = io.BytesIO()
    method = zipfile.ZIP_DEFLATED if compressed else zipfile.ZIP_STORED
    with zipfile.ZipFile(stream, "w", method) as archive:
        for name, data in members.items():
            archive.writestr(name + ".npy", data)
    return stream.getvalue()


def png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims `width` x `height` (the pixel data is never reached)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * 16)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def model_with(
    nodes: list, inputs: list, outputs: list, inits: list = (), domains=()
) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "hostile", inputs, outputs, list(inits))
    opsets = [helper.make_opsetid("", 17), *(helper.make_opsetid(d, 1) for d in domains)]
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 8
    return model


def matmul_model(columns: int = 4, name: str = "x", classes: object = None) -> onnx.ModelProto:
    """`name`[N, 4] -> MatMul -> y[N, `classes` or columns]."""
    weight = numpy_helper.from_array(np.ones((4, columns), np.float32), "w")
    x = onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, ["N", 4])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", classes or columns])
    return model_with([onnx.helper.make_node("MatMul", [name, "w"], ["y"])], [x], [y], [weight])


def no_input_model() -> onnx.ModelProto:
    value = helper.make_tensor("c", TensorProto.FLOAT, [2], [1.0, 2.0])
    node = helper.make_node("Constant", [], ["y"], value=value)
    return model_with([node], [], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])


def sequence_input_model() -> onnx.ModelProto:
    sequence = helper.make_tensor_sequence_value_info("s", TensorProto.FLOAT, None)
    node = helper.make_node("SequenceLength", ["s"], ["y"])
    return model_with(
        [node], [sequence], [helper.make_tensor_value_info("y", TensorProto.INT64, [])]
    )


def custom_op_model() -> onnx.ModelProto:
    node = helper.make_node("Mystery", ["x"], ["y"], domain="example.custom")
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])
    return model_with([node], [x], [y], domains=["example.custom"])


def save(model: onnx.ModelProto, path: Path) -> Path:
    path.write_bytes(model.SerializeToString())
    return path


def write(path: Path, data: bytes) -> Path:
    """`data` as the file `path` (a corrupt or forged input), returned for the command line."""
    path.write_bytes(data)
    return path
