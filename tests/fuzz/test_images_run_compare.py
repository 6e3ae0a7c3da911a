"""Hostile-user defects of the picture folders, `qdq run` and `qdq compare`, each a named case
as in test_regressions.py: exit code 2 and one line, nothing written, the inputs untouched."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from hostile import Workspace, X, quantize, refused, run_contract, save, write
from onnx import numpy_helper
from PIL import Image

import head_models
import models


@pytest.fixture
def ws(tmp_path: Path) -> Workspace:
    return Workspace(tmp_path)


@pytest.fixture
def quantized(ws: Workspace) -> Path:
    out = ws.folder / "q.onnx"
    assert ws.run("quantize", ws.model, "-o", out, "--calib", ws.calib).code == 0
    return out


@pytest.fixture
def images(ws: Workspace) -> Path:
    folder = ws.folder / "images"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(np.full((10, 12, 3), 40 * i, np.uint8)).save(folder / f"{i}.png")
    return folder


@pytest.mark.parametrize(
    ("flags", "words"),
    [
        (["--mean", "0.5", "0.5"], "--mean has 2 values for 3 channels"),
        (["--std", "0"], "--std must be non-zero"),
        (["--std", "1", "0", "1"], "--std must be non-zero"),
        # past float32: a raw numpy warning, then the pictures blamed for NaN (sweep 3)
        (["--std", "1e-45"], "beyond float32's 3.4e38"),
        (["--value-scale", "1e38"], "beyond float32's 3.4e38"),
        (["--mean", "1e39"], "beyond float32's 3.4e38"),
    ],
)
def test_image_options_that_cannot_normalize_are_refused_naming_the_flag(ws, images, flags, words):
    refused(ws, quantize(ws, images, *flags), words)


def test_an_image_folder_calibrates_a_one_channel_model(ws, images):
    model = models.conv_net()
    w1 = next(t for t in model.graph.initializer if t.name == "w1")
    w1.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(w1)[:, :1], "w1"))
    model.graph.input[0].type.tensor_type.shape.dim[1].dim_value = 1
    save(model, ws.model)
    assert run_contract(ws, quantize(ws, images), ws.folder / "out.onnx").code == 0


def test_run_takes_npy_inputs_for_a_single_input_model(ws, quantized):
    np.save(ws.folder / "x.npy", X)
    args = ["run", quantized, "--inputs", ws.folder / "x.npy", "-o", ws.folder / "y.npz"]
    assert run_contract(ws, args, ws.folder / "y.npz").code == 0


@pytest.mark.parametrize("engine", ["integer", "ort"])
@pytest.mark.parametrize(
    ("array", "words"),
    [
        (np.ones((2, 3, 9, 9), np.float32), "got float32[2, 3, 9, 9]"),
        (np.ones((2, 3, 8, 8), np.int64), "got int64[2, 3, 8, 8]"),
        (np.ones((3, 8, 8), np.float32), "got float32[3, 8, 8]"),
    ],
)
def test_run_checks_feeds_against_the_declared_shapes_and_dtypes(
    ws, quantized, engine, array, words
):
    np.savez(ws.folder / "bad.npz", x=array)
    args = ["run", quantized, "--inputs", ws.folder / "bad.npz", "-o", ws.folder / "y.npz"]
    refused(ws, [*args, "--engine", engine], words, ws.folder / "y.npz")


def test_run_refuses_corrupt_inputs(ws, quantized):
    write(ws.folder / "bad.npz", ws.calib.read_bytes()[:200])
    args = ["run", quantized, "--inputs", ws.folder / "bad.npz", "-o", ws.folder / "y.npz"]
    refused(ws, args, "not a readable .npz", ws.folder / "y.npz")


def compare(ws: Workspace, quantized: Path, data: Path, *flags: object) -> list:
    return ["compare", ws.model, quantized, "--data", data, "--latency-runs", "0", *flags]


def test_compare_refuses_models_with_different_inputs(ws):
    save(head_models.classifier_head(), ws.folder / "other.onnx")
    refused(ws, compare(ws, ws.folder / "other.onnx", ws.calib), "take different inputs")


def test_compare_refuses_a_bad_metadata_entry(ws, quantized):
    model = onnx.load(str(quantized))
    model.metadata_props[0].value = "{not json"
    save(model, quantized)
    refused(ws, compare(ws, quantized, ws.calib), "is not a JSON object of tensor names")


@pytest.mark.parametrize(
    "forged",
    [
        "{not json",
        "[1, 2]",
        '{"c": "low"}',
        '{"a": NaN}',
        '{"a": true}',
        '{"a": 1' + "0" * 400 + "}",
    ],
)
def test_compare_refuses_a_bad_floors_entry(ws, quantized, forged):
    model = onnx.load(str(quantized))
    entry = next(p for p in model.metadata_props if p.key == "qdq.floored_tensors")
    entry.value = forged
    save(model, quantized)
    refused(ws, compare(ws, quantized, ws.calib), "is not a JSON object of tensor names and finite")


@pytest.mark.parametrize("labels", [np.arange(3), np.array(list("abcdefgh")), np.ones((8, 2))])
def test_compare_refuses_labels_that_are_short_or_not_class_indices(ws, quantized, labels):
    np.savez(ws.folder / "data.npz", x=X, label=labels)
    refused(ws, compare(ws, quantized, ws.folder / "data.npz"), "one integer class index")


@pytest.mark.parametrize("wrong", [500, -3])
def test_compare_refuses_labels_beyond_the_outputs_classes(ws, quantized, wrong):
    """They had scored 0% accuracy without a word (the model has 5 classes)."""
    labels = np.arange(len(X)) % 5
    labels[2] = wrong
    np.savez(ws.folder / "data.npz", x=X, label=labels)
    refused(ws, compare(ws, quantized, ws.folder / "data.npz"), "the first output has 5 classes")


@pytest.mark.parametrize("count", ["-1", "0"])
def test_compare_refuses_max_samples_below_one(ws, quantized, count):
    refused(ws, compare(ws, quantized, ws.calib, "--max-samples", count), ">= 1", None)
