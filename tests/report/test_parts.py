"""A detector head in `qdq compare`, the HTML report and the command line: each part of its
output (boxes, class scores) judged apart, found from the data or declared with a flag."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from head_models import yolo_head
from qdq.cli import main
from qdq.report.compare import compare_models
from qdq.report.html import render
from qdq.report.measure import measure

RNG = np.random.default_rng(3)


@pytest.fixture(scope="module")
def head(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """The YOLO-style head, its quantized model (by the command line) and held-out data."""
    folder = tmp_path_factory.mktemp("head")
    (folder / "head.onnx").write_bytes(yolo_head().SerializeToString())
    np.savez(folder / "calib.npz", x=RNG.standard_normal((64, 3, 8, 8)).astype(np.float32))
    np.savez(folder / "held.npz", x=RNG.standard_normal((40, 3, 8, 8)).astype(np.float32))
    out = folder / "head_int8.onnx"
    args = ["quantize", folder / "head.onnx", "-o", out, "--calib", folder / "calib.npz"]
    assert main([str(a) for a in args]) == 0
    return folder / "head.onnx", out, folder / "held.npz"


def test_compare_judges_boxes_and_scores_apart(head):
    result = compare_models(*head, latency_runs=0)
    assert list(result.parts) == ["y[:, 0:4]", "y[:, 4:7]"]
    scores = result.as_dict()["parts"]["y[:, 4:7]"]
    assert 0 < scores["detection_f1"] <= 1
    assert 0 < scores["top1_agreement"] <= 1
    # The parts are a partition of the output: their error sums add up to the whole's.
    whole = result.outputs["y"]
    assert sum(p.error.noise for p in result.parts.values()) == pytest.approx(whole.noise)
    assert "part 'y[:, 4:7]' (scores)" in result.to_text()
    assert "F1 of FP32's detections" in result.to_text()


def test_declared_parts_replace_the_found_ones(head):
    result = compare_models(*head, latency_runs=0, declared=["y:1:0-2,2-4,4-7"])
    assert list(result.parts) == ["y[:, 0:2]", "y[:, 2:4]", "y[:, 4:7]"]
    assert "detection_f1" not in result.as_dict()["parts"]["y[:, 4:7]"]  # not a [4 | k] head


def test_the_html_summary_shows_each_part(head):
    page = render(measure(*head))
    assert "F1 of FP32's detections" in page
    assert "y[:, 4:7]" in page


def test_quantize_prints_each_part_and_takes_declared_ones(head, tmp_path, capsys):
    source, _, _ = head
    calib = source.parent / "calib.npz"
    args = ["quantize", source, "-o", tmp_path / "q.onnx", "--calib", calib]
    assert main([str(a) for a in [*args, "--output-parts", "y:1:0-2,2-7"]]) == 0
    printed = capsys.readouterr().out
    assert "'y[:, 0:2]'" in printed
    assert "'y[:, 2:7]'" in printed


@pytest.mark.parametrize(
    ("spec", "says"),
    [("y:1:0-4,4-99", "does not fit"), ("boxes:1:0-4", "names no float output"), ("y", "NAME:")],
)
def test_a_bad_declaration_is_one_line_naming_the_flag(head, tmp_path, capsys, spec, says):
    source, _, _ = head
    calib = source.parent / "calib.npz"
    args = ["quantize", source, "-o", tmp_path / "q.onnx", "--calib", calib]
    assert main([str(a) for a in [*args, "--output-parts", spec]]) == 2
    err = capsys.readouterr().err
    assert err.startswith("qdq: error: --output-parts")
    assert says in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "q.onnx").exists()


def test_report_takes_declared_parts(head, tmp_path):
    """`qdq report --output-parts` draws the declared parts (the flag had not reached it)."""
    source, quantized, data = head
    page = tmp_path / "r.html"
    args = ["report", source, quantized, "--data", data, "-o", page]
    assert main([*map(str, args), "--output-parts", "y:1:0-2,2-4,4-7"]) == 0
    assert "y[:, 0:2]" in page.read_text()
