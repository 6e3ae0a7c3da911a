"""Files a hostile or careless user hands qdq that ONNX's checker lets through: broken text,
undefined types, ambiguous external data, file names that are not UTF-8, two models given the
wrong way round. Each is one line and exit 2, or runs."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import onnx
import pytest
from hostile import Workspace, quantize, refused, run_contract, save, write
from onnx import numpy_helper

import models


@pytest.fixture
def ws(tmp_path: Path) -> Workspace:
    return Workspace(tmp_path)


@pytest.fixture
def quantized(ws: Workspace) -> Path:
    out = ws.folder / "q.onnx"
    assert ws.run("quantize", ws.model, "-o", out, "--calib", ws.calib).code == 0
    return out


@pytest.mark.parametrize("field", [b"doc string", b"meta value"])
def test_broken_utf8_anywhere_in_the_model_is_refused(ws, field):
    """Names of nodes and values had been checked, not the model's other strings: a doc
    string, a metadata value or an initializer's name in broken UTF-8 ended inside a pass."""
    model = onnx.load(str(ws.model))
    if field == b"doc string":
        model.doc_string = "doc string"
    else:
        model.metadata_props.add(key="k", value="meta value")
    data = bytearray(model.SerializeToString())
    data[data.index(field) + 1] = 0xFF
    write(ws.model, bytes(data))
    refused(ws, quantize(ws), "broken UTF-8")


def test_a_tensor_of_an_undefined_type_is_refused(ws):
    model = onnx.load(str(ws.model))
    model.graph.initializer[0].data_type = 999  # ONNX's checker lets it through
    save(model, ws.model)
    refused(ws, quantize(ws), "data type 999")


def test_external_data_naming_its_file_twice_is_refused(ws):
    """ONNX reads the last `location` given, qdq had checked the first."""
    model = models.conv_net()
    weight = next(t for t in model.graph.initializer if t.name == "w2")
    array = numpy_helper.to_array(weight)
    (ws.folder / "w2.bin").write_bytes(array.tobytes())
    (ws.folder / "short.bin").write_bytes(b"\0" * 8)
    weight.ClearField("raw_data")
    weight.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", "w2.bin"), ("length", str(array.nbytes)),
                       ("location", "short.bin")):  # fmt: skip
        weight.external_data.add(key=key, value=value)
    save(model, ws.model)
    refused(ws, quantize(ws), "a key given twice")


def test_a_model_whose_file_name_is_not_utf8_is_compared_and_reported(ws):
    """ONNX Runtime's binding takes UTF-8 paths only; Python names other bytes with
    surrogates: compare's timings and the HTML report's title had been internal errors."""
    model = ws.folder / os.fsdecode(b"m\xff.onnx")
    shutil.copy(ws.model, model)
    out, report = ws.folder / "q.onnx", ws.folder / "r.html"
    result = run_contract(
        ws, ["quantize", model, "-o", out, "--calib", ws.calib, "--report", report], out
    )
    assert result.code == 0, result.stderr
    assert run_contract(ws, ["compare", model, out, "--data", ws.calib], None).code == 0


@pytest.mark.parametrize("command", ["compare", "report"])
def test_models_given_the_wrong_way_round_are_refused(ws, quantized, command):
    """The INT8 file as the FP32 reference: compare had measured it without a word."""
    args = [command, quantized, ws.model, "--data", ws.calib]
    args += ["-o", ws.folder / "r.html"] if command == "report" else []
    refused(ws, args, "give the FP32 model first")
