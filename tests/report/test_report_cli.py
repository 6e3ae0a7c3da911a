"""`qdq report` and `qdq quantize --report` as a user runs them."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

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


def test_compare_reads_a_picture_folder_as_quantize_does(int8, tmp_path, capsys):
    """A folder of pictures with the image flags measures what an .npz of the same
    preprocessed samples measures, and the output says how the pictures were read."""
    digits = np.load(DIGITS / "test.npz")["input"][:40]  # values k / 16
    pictures = tmp_path / "pictures"
    pictures.mkdir()
    for i, digit in enumerate(digits):
        Image.fromarray((digit[0] * 240).astype(np.uint8)).save(pictures / f"{i:02d}.png")
    np.savez(tmp_path / "same.npz", input=digits)
    pair = ["compare", str(DIGITS / "cnn.onnx"), str(int8), "--latency-runs", "0", "--json"]
    assert main([*pair, "--data", str(tmp_path / "same.npz")]) == 0
    arrays = json.loads(capsys.readouterr().out)
    flags = ["--value-scale", "1", "--std", "240"]  # 15 k / 240 = k / 16, exactly
    assert main([*pair, "--data", str(pictures), *flags]) == 0
    read = json.loads(capsys.readouterr().out)
    assert read["notes"] == [
        f"{pictures}: pictures read as grayscale 8x8 (resized), pixels times 1, less mean [0.0], "
        "over std [240.0], NCHW"
    ]
    assert read["outputs"] == arrays["outputs"]
    assert arrays["notes"] == []
    # quantize's --report measures on its --calib folder, read with the same flags
    out, page = tmp_path / "int8.onnx", tmp_path / "r.html"
    args = ["quantize", str(DIGITS / "cnn.onnx"), "-o", str(out), "--calib", str(pictures)]
    assert main([*args, *flags, "--report", str(page)]) == 0
    assert "pictures read as grayscale 8x8" in page.read_text()  # in the summary


@pytest.mark.parametrize(
    ("extra", "says"),
    [
        (["--data-free", "--input-range", "0", "1"], "--report measures on the calibration data"),
        (["--calib", "CALIB", "--report", "OUT"], "is the -o model"),
        (["--calib", "CALIB", "--report", "NOWHERE/r.html"], "does not exist"),
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


def test_quantize_report_shows_how_the_plan_was_chosen(tmp_path, capsys):
    """The page says what the run's summary says: its notes and the candidate plans, each with
    its score and time, the chosen one marked."""
    out, page = tmp_path / "q.onnx", tmp_path / "r.html"
    args = ["quantize", str(DIGITS / "cnn.onnx"), "-o", str(out), "--calib"]
    assert main([*args, str(DIGITS / "calib.npz"), "--report", str(page)]) == 0
    printed = capsys.readouterr().out
    html = page.read_text()
    section = html[html.index('<section id="plan">') :].split("</section>")[0]
    line = next(n for n in printed.splitlines() if n.startswith("candidate plans"))
    plans = line.split("): ", 1)[1].split("; FP32")[0].split(", ")  # "all int8 42.10 dB 0.021 ms"
    chosen = next(p for p in plans if p.endswith("(chosen)"))
    name = re.match(r"(.+?) -?(inf|[\d.]+) dB", chosen)[1]
    assert f"<tr class=chosen><td>{name}</td>" in section
    assert section.count("<tr") == len(plans) + 2  # the header, each plan, FP32
    assert "range method" in section  # the notes
