"""The `qdq` command as a user runs it: one clear line and exit code 2 on bad input, with
nothing written and the input untouched."""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import models
from qdq.cli.flags import check_quantize_flags
from qdq.cli.parser import build_parser
from qdq.errors import UsageError

from conftest import DIGITS, digits_cnn_sqnr


def qdq(*args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "qdq.cli", *map(str, args)], capture_output=True, text=True
    )


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    shutil.copy(DIGITS / "cnn.onnx", tmp_path / "cnn.onnx")
    shutil.copy(DIGITS / "calib.npz", tmp_path / "calib.npz")
    return tmp_path


@pytest.mark.slow
def test_quantize_then_compare_reports_accuracy_size_and_latency(workspace):
    out = workspace / "int8.onnx"
    done = qdq("quantize", workspace / "cnn.onnx", "-o", out, "--calib", workspace / "calib.npz")
    assert done.returncode == 0, done.stderr
    assert "10 of 10 nodes quantized" in done.stdout
    done = qdq(
        "compare",
        workspace / "cnn.onnx",
        out,
        "--data",
        DIGITS / "test.npz",
        "--json",
        "--latency-runs",
        "3",
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["accuracy"]["quantized"] >= result["accuracy"]["float"] - 0.005
    assert result["outputs"]["logits"]["sqnr_db"] > 25
    assert result["outputs"]["logits"]["top1_agreement"] > 0.99
    assert result["size_bytes"]["quantized"] < result["size_bytes"]["float"]
    assert set(result["latency_ms"]) == {"float", "quantized"}
    assert len(result["layers"]) >= 5


@pytest.mark.slow
def test_the_sequential_bias_correction_and_gptq_can_be_turned_off(workspace):
    runs = {
        "default": [],
        "nearest": ["--nearest-rounding"],
        "one_shot": ["--nearest-rounding", "--no-sequential-bias-correction"],
    }
    sqnr = {}
    for name, extra in runs.items():
        out = workspace / f"{name}.onnx"
        done = qdq(
            "quantize", workspace / "cnn.onnx", "-o", out, "--calib", workspace / "calib.npz",
            "--weight-bits", "4", *extra,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        sqnr[name] = digits_cnn_sqnr(out)
    assert sqnr["nearest"] > sqnr["one_shot"] + 2.0  # measured 21.8 vs 18.5
    assert sqnr["default"] > sqnr["nearest"] + 1.0  # GPTQ: measured 24.4


def test_inspect_lists_every_node():
    done = qdq("inspect", DIGITS / "mobilenet.onnx")
    assert done.returncode == 0, done.stderr
    # the Relus, Clips and pools are int8 only where int8 reaches them, as quantize decides
    assert "8 of 17 nodes quantizable, 9 more where int8 flows into them" in done.stdout
    assert qdq("inspect", DIGITS / "cnn.onnx", "-v").returncode == 0  # -v after the command too


def _write_npz(path: Path, **arrays: np.ndarray) -> Path:
    np.savez(path, **arrays)
    return path


def _bad_inputs(w: Path) -> dict[str, tuple[list, str]]:
    """name -> (extra arguments with the model first, expected words in the error)."""
    good = np.load(w / "calib.npz")["input"]
    (w / "garbage.onnx").write_bytes(np.random.default_rng(0).bytes(2000))
    (w / "notes.onnx").write_text("this is not a model\n" * 20)
    old = models.conv_net()
    old.opset_import[0].version = 99  # newer than any onnx release
    onnx.save(old, str(w / "opset99.onnx"))
    nan = good.copy()
    nan[3, 0, 2, 2] = np.nan
    return {
        "missing model": ([w / "nope.onnx"], "does not exist"),
        "corrupt model": ([w / "garbage.onnx"], "ONNX"),
        "not a model": ([w / "notes.onnx"], "ONNX"),
        "unsupported opset": ([w / "opset99.onnx"], "opset 99"),
        "missing data": ([w / "cnn.onnx", "--calib", w / "none.npz"], "does not exist"),
        "wrong names": (
            [w / "cnn.onnx", "--calib", _write_npz(w / "n.npz", image=good, other=good)],
            "'input'",
        ),
        "wrong shape": (
            [w / "cnn.onnx", "--calib", _write_npz(w / "s.npz", input=good[:, :, :4])],
            "shape",
        ),
        "wrong dtype": (
            [w / "cnn.onnx", "--calib", _write_npz(w / "d.npz", input=good.astype(np.int64))],
            "float32",
        ),
        "nan": ([w / "cnn.onnx", "--calib", _write_npz(w / "nan.npz", input=nan)], "NaN"),
        "no samples": (
            [w / "cnn.onnx", "--calib", _write_npz(w / "e.npz", input=good[:0])],
            "no samples",
        ),
        "output is input": ([w / "cnn.onnx", "--same"], "is the input"),
        "no output folder": ([w / "cnn.onnx", "--to", w / "missing" / "q.onnx"], "does not exist"),
        "1-bit weights": ([w / "cnn.onnx", "--weight-bits", "1"], "--weight-grid binary"),
        "bits of binary weights": (
            [w / "cnn.onnx", "--weight-grid", "binary", "--weight-bits", "4"],
            "drop --weight-bits (4)",  # they had been ignored, and the file recorded 4 bits
        ),
    }


@pytest.mark.parametrize(
    "case",
    [
        "missing model",
        "corrupt model",
        "not a model",
        "unsupported opset",
        "missing data",
        "wrong names",
        "wrong shape",
        "wrong dtype",
        "nan",
        "no samples",
        "output is input",
        "no output folder",
        "1-bit weights",
        "bits of binary weights",
    ],
)
def test_bad_input_is_one_line_exit_2_nothing_written(workspace, case):
    args, words = _bad_inputs(workspace)[case]
    model = args[0]
    rest = [a for a in args[1:] if a not in ("--same", "--to")]
    out = workspace / "out.onnx"
    if "--same" in args:
        out = model
    if "--to" in args:
        out = args[args.index("--to") + 1]
        rest = []
    calib = [] if "--calib" in rest else ["--calib", workspace / "calib.npz"]
    before = {p: digest(p) for p in workspace.iterdir() if p.is_file()}
    done = qdq("quantize", model, "-o", out, *calib, *rest)
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith("qdq: error: ")
    assert words in done.stderr
    after = {p: digest(p) for p in workspace.iterdir() if p.is_file()}
    assert after == before  # nothing written, the input untouched
    assert not any(p.name.startswith(".qdq-") for p in workspace.iterdir())


def _with_external_data(folder: Path, location: str) -> Path:
    model = models.conv_net()
    weight = next(t for t in model.graph.initializer if t.name == "w2")
    array = numpy_helper.to_array(weight)
    (folder / "w2.bin").write_bytes(array.tobytes())
    weight.ClearField("raw_data")
    weight.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", str(array.nbytes))):
        entry = weight.external_data.add()
        entry.key, entry.value = key, value
    path = folder / "ext.onnx"
    onnx.save(model, str(path))
    return path


def test_external_data_inside_the_folder_is_read(tmp_path):
    model = _with_external_data(tmp_path, "w2.bin")
    np.save(tmp_path / "x.npy", np.ones((4, 3, 8, 8), np.float32))
    done = qdq("quantize", model, "-o", tmp_path / "q.onnx", "--calib", tmp_path / "x.npy")
    assert done.returncode == 0, done.stderr


def test_external_data_escaping_the_folder_is_refused(tmp_path):
    inner = tmp_path / "models"
    inner.mkdir()
    model = _with_external_data(inner, "../w2.bin")
    shutil.move(inner / "w2.bin", tmp_path / "w2.bin")
    np.save(tmp_path / "x.npy", np.ones((4, 3, 8, 8), np.float32))
    done = qdq("quantize", model, "-o", tmp_path / "q.onnx", "--calib", tmp_path / "x.npy")
    assert done.returncode == 2
    assert "outside the model's folder" in done.stderr
    assert not (tmp_path / "q.onnx").exists()


def test_model_over_two_gigabytes_is_refused_before_reading_it(tmp_path):
    model = models.conv_net()
    huge = onnx.TensorProto(name="huge", data_type=onnx.TensorProto.FLOAT, dims=[2**29 + 1])
    huge.data_location = onnx.TensorProto.EXTERNAL
    huge.external_data.add(key="location", value="huge.bin")
    model.graph.initializer.append(huge)
    with open(tmp_path / "huge.bin", "wb") as sparse:  # 2 GB of nothing on disk
        sparse.truncate(4 * (2**29 + 1))
    onnx.save(model, str(tmp_path / "big.onnx"))
    np.save(tmp_path / "x.npy", np.ones((4, 3, 8, 8), np.float32))
    done = qdq(
        "quantize", tmp_path / "big.onnx", "-o", tmp_path / "q.onnx", "--calib", tmp_path / "x.npy"
    )
    assert done.returncode == 2
    assert "2.0 GB" in done.stderr
    assert "under 2 GB" in done.stderr
    assert not (tmp_path / "q.onnx").exists()


@pytest.mark.slow
def test_run_writes_the_integer_engines_outputs(tmp_path):
    out = tmp_path / "q.onnx"
    assert (
        qdq(
            "quantize",
            DIGITS / "cnn.onnx",
            "-o",
            out,
            "--calib",
            DIGITS / "calib.npz",
            "--format",
            "qoperator",
        ).returncode
        == 0
    )
    x = np.load(DIGITS / "test.npz")["input"][:16]
    np.savez(tmp_path / "x.npz", input=x)
    for engine in ("integer", "ort"):
        done = qdq(
            "run",
            out,
            "--inputs",
            tmp_path / "x.npz",
            "-o",
            tmp_path / f"{engine}.npz",
            "--engine",
            engine,
            "--requant",
            "float",
        )
        assert done.returncode == 0, done.stderr
    integer = np.load(tmp_path / "integer.npz")["logits"]
    reference = np.load(tmp_path / "ort.npz")["logits"]
    assert np.array_equal(integer.argmax(axis=1), reference.argmax(axis=1))
    done = qdq("run", out, "--inputs", tmp_path / "nope.npz", "-o", tmp_path / "y.npz")
    assert done.returncode == 2
    assert "does not exist" in done.stderr


@pytest.mark.slow
def test_data_free_needs_no_calibration_data(tmp_path):
    out = tmp_path / "q.onnx"
    done = qdq(
        "quantize",
        DIGITS / "mobilenet_bn.onnx",
        "-o",
        out,
        "--data-free",
        "--input-range",
        "0",
        "1",
    )
    assert done.returncode == 0, done.stderr
    assert "calibrated on 0 samples" in done.stdout
    done = qdq("quantize", DIGITS / "cnn.onnx", "-o", tmp_path / "r.onnx")
    assert done.returncode == 2
    assert "--calib" in done.stderr


def test_help_exits_0_and_usage_errors_are_one_line_exit_2():
    assert qdq("quantize", "--help").returncode == 0
    done = qdq("quantize", "--method", "nope")
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1
    assert done.stderr.startswith("qdq: error: ")
    assert "see `qdq quantize --help`" in done.stderr


def test_every_flag_of_every_command_says_what_it_does():
    """--help is where a user learns a flag: none is listed without a line of its own."""
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    bare = {
        (name, action.option_strings[-1])
        for name, command in commands.choices.items()
        for action in command._actions
        if action.option_strings and not action.help
    }
    assert len(commands.choices) >= 9
    assert not bare


def test_errors_name_the_flag_where_the_library_names_the_parameter(tmp_path):
    """The library says `data_free`; the command line says --data-free."""
    done = qdq("quantize", DIGITS / "cnn.onnx", "-o", tmp_path / "q.onnx", "--data-free")
    assert done.returncode == 2
    assert "--data-free needs" in done.stderr
    assert "`" not in done.stderr


def test_a_report_that_fails_takes_the_model_and_its_table_with_it(tmp_path, monkeypatch):
    """The model, its --table and its --report are one result: a failure leaves none of them."""
    import qdq.cli.commands

    def fails(*args: object, **kwargs: object) -> str:
        raise RuntimeError("the report broke")

    monkeypatch.setattr(qdq.cli.commands, "_write_html", fails)
    code = qdq.cli.main(
        [
            "quantize", str(DIGITS / "cnn.onnx"), "-o", str(tmp_path / "q.onnx"),
            "--calib", str(DIGITS / "calib.npz"), "--table", f"tensorrt:{tmp_path / 't.cache'}",
            "--report", str(tmp_path / "r.html"),
        ]
    )  # fmt: skip
    assert code == 1
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_a_summary_stdout_cannot_take_is_one_line_saying_the_command_finished():
    with open("/dev/full", "w") as full:
        done = subprocess.run(
            [sys.executable, "-m", "qdq.cli", "inspect", DIGITS / "transformer.onnx"],
            stdout=full,
            stderr=subprocess.PIPE,
            text=True,
        )
    assert done.returncode == 2
    assert done.stderr == (
        "qdq: error: the command finished, but its summary cannot go to stdout: "
        "No space left on device\n"
    )


def test_a_reader_that_closed_its_pipe_gets_a_quiet_exit_0():
    """`qdq inspect model.onnx | head -0`: it said '[Errno 32] Broken pipe', exit 2."""
    command = [sys.executable, "-m", "qdq.cli", "inspect", DIGITS / "transformer.onnx"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    process.stdout.close()
    error = process.stderr.read()
    assert (process.wait(), error) == (0, b"")


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--prefer", "speed"], "--prefer does nothing"),
        (["--output-parts", "y:1:0-2,2-4"], "--output-parts does nothing"),
        (["--nearest-rounding", "--no-smoothing"], "--nearest-rounding, --no-smoothing do"),
        (["--no-sequential-bias-correction"], "--no-sequential-bias-correction does"),
    ],
)
def test_data_free_refuses_the_flags_it_would_not_read(flags, named):
    """Data-free planning has no candidate plans, checks or calibration steps: a flag that
    steers them had been accepted and left the file as it was."""
    args = build_parser().parse_args(["quantize", "m.onnx", "-o", "q.onnx", "--data-free", *flags])
    with pytest.raises(UsageError, match=named):
        check_quantize_flags(args)
    args = build_parser().parse_args(["quantize", "m.onnx", "-o", "q.onnx", "--data-free"])
    check_quantize_flags(args)
