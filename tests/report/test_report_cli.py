"""`qdq report` and `qdq quantize --report` as a user runs them."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from qdq.cli import main

from conftest import DIGITS


@pytest.fixture(scope="module")
def int8(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("int8") / "cnn_int8.onnx"
    assert (
        main(
            [
                "quantize",
                str(DIGITS / "cnn.onnx"),
                "-o",
                str(out),
                "--calib",
                str(DIGITS / "calib.npz"),
            ]
        )
        == 0
    )
    return out


def test_report_writes_one_html_file(int8, tmp_path, capsys):
    out = tmp_path / "report.html"
    code = main(
        [
            "report",
            str(DIGITS / "cnn.onnx"),
            str(int8),
            "--data",
            str(DIGITS / "test.npz"),
            "-o",
            str(out),
            "--max-samples",
            "64",
        ]
    )
    assert code == 0
    assert f"wrote {out}: HTML report" in capsys.readouterr().out
    page = out.read_text()
    assert page.startswith("<!DOCTYPE html>")
    assert "int8: int8 kernel" in page  # the static decision's reason, borne out by the model
    assert [p.name for p in tmp_path.iterdir()] == ["report.html"]


@pytest.mark.parametrize(
    ("extra", "says"),
    [
        (["--data-free", "--input-range", "0", "1"], "--report measures on the calibration data"),
        (["--calib", "CALIB", "--report", "OUT"], "is the -o model"),
        (["--calib", "CALIB", "--report", "NOWHERE/r.html"], "does not exist"),
        (["--calib", "CALIB", "--report", "r.html", "--mean", "0.5"], "without the image flags"),
    ],
)
def test_a_bad_report_flag_is_refused_before_any_work(tmp_path, capsys, extra, says):
    shutil.copy(DIGITS / "calib.npz", tmp_path / "calib.npz")
    out = tmp_path / "int8.onnx"
    swap = {"CALIB": str(tmp_path / "calib.npz"), "OUT": str(out), "NOWHERE": str(tmp_path / "no")}
    extra = [swap.get(a, a) for a in extra]
    extra = [a.replace("NOWHERE", str(tmp_path / "no")) for a in extra]
    if "--report" not in extra:
        extra += ["--report", str(tmp_path / "r.html")]
    code = main(["quantize", str(DIGITS / "cnn.onnx"), "-o", str(out), *extra])
    err = capsys.readouterr().err
    assert code == 2
    assert says in err
    assert len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib.npz"]  # nothing written
