"""A recognizer's output in the reports: beside its SQNR, how many samples it reads as FP32 does
(its text, as CTC decodes it), in `qdq quantize`'s summary, `qdq compare` and the HTML report."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import onnx
import pytest

from head_models import step_softmax
from qdq.cli import main
from qdq.report.compare import compare_models
from qdq.report.html import render
from qdq.report.measure import measure

STEPS, CLASSES = 24, 6


def recognizer(weights: np.ndarray) -> onnx.ModelProto:
    """x[N, STEPS, CLASSES] -> Softmax(x @ weights): per step, class probabilities."""
    return step_softmax("MatMul", weights, STEPS, CLASSES)


def lines(count: int, seed: int) -> np.ndarray:
    """Steps as a CTC head sees them: blank (class 0) at most steps, 5 characters between."""
    rng = np.random.default_rng(seed)
    tops = np.zeros((count, STEPS), np.int64)
    tops[:, 2:17:3] = rng.integers(1, CLASSES, (count, 5))
    x = np.eye(CLASSES)[tops] * 3.0 + rng.normal(0, 0.3, (count, STEPS, CLASSES))
    return x.astype(np.float32)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """FP32, its quantization by the command line, a model that reads other classes, data."""
    folder = tmp_path_factory.mktemp("recognizer")
    weights = 2.0 * np.eye(CLASSES) + np.random.default_rng(0).normal(0, 0.05, (CLASSES,) * 2)
    made = {"fp32": recognizer(weights), "wrong": recognizer(-weights)}
    for name, model in made.items():
        onnx.save(model, folder / f"{name}.onnx")
    np.savez(folder / "calib.npz", x=lines(64, 1))
    np.savez(folder / "held.npz", x=lines(40, 2))
    paths = {n: folder / f"{n}.onnx" for n in [*made, "int8"]}
    paths |= {"calib": folder / "calib.npz", "held": folder / "held.npz"}
    args = ["quantize", paths["fp32"], "-o", paths["int8"], "--calib", paths["calib"]]
    assert main([str(a) for a in args]) == 0
    return paths


def test_quantize_says_how_many_samples_the_recognizer_reads_as_fp32(files, tmp_path, capsys):
    capsys.readouterr()
    args = ["quantize", files["fp32"], "-o", tmp_path / "q.onnx", "--calib", files["calib"]]
    assert main([str(a) for a in args]) == 0
    printed = capsys.readouterr().out
    shown = r"'probs' [\d.]+ dB \(CTC reading as FP32's on (\d+) of (\d+) samples\)"
    said = re.search(shown, printed)
    assert said, printed
    assert said.groups() == ("16", "16")  # the report's 16 check samples, each read alike


def test_compare_counts_the_samples_read_alike_and_those_that_are_not(files):
    alike = compare_models(files["fp32"], files["int8"], files["held"], latency_runs=0)
    assert alike.as_dict()["outputs"]["probs"]["read_alike"] == 1.0
    assert "CTC reading as FP32's on 40 of 40 samples" in alike.to_text()
    wrong = compare_models(files["fp32"], files["wrong"], files["held"], latency_runs=0)
    assert wrong.as_dict()["outputs"]["probs"]["read_alike"] == 0.0
    assert "CTC reading as FP32's on 0 of 40 samples" in wrong.to_text()
    page = render(measure(files["fp32"], files["wrong"], files["held"]))
    assert "CTC reading as FP32&#x27;s on 0 of 40 samples" in page
