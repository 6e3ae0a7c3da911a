"""Signals in every stage and internal errors: the exit code, one line, nothing left behind
(neither beside the output nor in the temporary folder)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from hostile import Workspace, run_contract


@pytest.fixture
def ws(tmp_path: Path) -> Workspace:
    return Workspace(tmp_path)


def quantize(ws: Workspace, *flags: object) -> list:
    return ["quantize", ws.model, "-o", ws.folder / "out.onnx", "--calib", ws.calib, *flags]


STAGES = {  # where a signal lands: (module, function) patched to signal itself
    "load": ("qdq.pipeline", "load_model"),
    "calibrate": ("qdq.ptq", "observe_holding"),
    "ort rewrite": ("qdq.onnx.model", "open_session"),  # $TMPDIR/qdq-*/in.onnx exists then
    "save": ("qdq.onnx.model", "os"),  # between the staged write and its rename
}


def _signalling(real, signum: int):
    def patched(*args, **kwargs):
        os.kill(os.getpid(), signum)
        return real(*args, **kwargs)

    return patched


class _ReplaceSignals:
    """`os` for qdq.onnx.model whose `replace` signals first: the save's last moment."""

    def __init__(self, signum: int) -> None:
        self.signum = signum

    def __getattr__(self, name: str):
        real = getattr(os, name)
        return _signalling(real, self.signum) if name == "replace" else real


@pytest.mark.parametrize("stage", list(STAGES))
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_a_signal_in_any_stage_exits_128_plus_it_leaving_nothing(ws, monkeypatch, stage, signum):
    module, name = STAGES[stage]
    target = sys.modules[module] if module in sys.modules else __import__(module, fromlist=["_"])
    if name == "os":
        monkeypatch.setattr(target, "os", _ReplaceSignals(signum))
    else:
        monkeypatch.setattr(target, name, _signalling(getattr(target, name), signum))
    result = run_contract(ws, quantize(ws, "--format", "qoperator"), None, (128 + signum,))
    assert "interrupted by" in result.stderr
    assert not (ws.folder / "out.onnx").exists()


def test_an_internal_error_names_the_stage_and_a_log_holding_the_traceback(ws, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr("qdq.ptq.observe_holding", broken)
    result = ws.run(*quantize(ws))
    assert result.code == 1
    assert result.stderr.count("\n") == 1
    assert "internal error in quantize at qdq.ptq.plan_model" in result.stderr
    log = Path(result.stderr.split("traceback is in ")[1].split(" ")[0])
    assert "RuntimeError: a bug" in log.read_text()
    log.unlink()
    assert not (ws.folder / "out.onnx").exists()
    verbose = ws.run("-v", *quantize(ws))
    assert "Traceback" in verbose.stderr
    Path(verbose.stderr.split("traceback is in ")[1].split(" ")[0]).unlink()


def test_sigterm_to_a_real_process_exits_143_and_leaves_nothing(ws):
    """A real process, signalled by the OS just after it writes its first model file."""
    script = (
        "import os, signal, sys, qdq.onnx.model as m\n"
        "real = m._save\n"
        "def save(model, path):\n"
        "    real(model, path)\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "m._save = save\n"
        "from qdq.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    env = {**os.environ, "TMPDIR": str(ws.temp)}
    done = subprocess.run(
        [sys.executable, "-c", script, *map(str, quantize(ws))],
        capture_output=True, text=True, env=env,
    )  # fmt: skip
    assert done.returncode == 143, done.stderr
    assert done.stderr == "qdq: interrupted by SIGTERM; nothing was written\n"
    assert not list(ws.folder.rglob(".qdq-*"))
    # onnxruntime keeps a session id in $TMPDIR/.ses from its import on: not a run's leftover
    assert [p.name for p in ws.temp.iterdir()] in ([], [".ses"])
    assert not (ws.folder / "out.onnx").exists()


@pytest.mark.parametrize("fault", ["report", "signal"])
def test_a_failing_report_keeps_the_earlier_model_and_table(ws, monkeypatch, fault):
    """The model, its table and its report are one result: when the report fails (a full
    disk) or a signal lands while it is measured, the files an earlier run wrote are back as
    they were, and the new ones gone (the model and table had been deleted)."""
    model, table, report = (ws.folder / name for name in ("out.onnx", "out.cache", "out.html"))
    model.write_text("earlier model")
    table.write_text("earlier table")

    def broken(*args, **kwargs):
        if fault == "signal":
            os.kill(os.getpid(), signal.SIGTERM)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("qdq.report.html.write_report", broken)
    flags = ("--report", report, "--table", f"tensorrt:{table}", "--prefer", "int8")
    result = ws.run(*quantize(ws, *flags))
    assert result.code == (143 if fault == "signal" else 2), result.stderr
    assert (model.read_text(), table.read_text()) == ("earlier model", "earlier table")
    assert not report.exists()
    assert not list(ws.folder.glob(".*qdq-previous"))
    assert sorted(p.name for p in ws.folder.iterdir() if p.name.startswith("out")) == [
        "out.cache",
        "out.onnx",
    ]


def test_an_error_raised_while_a_signal_unwinds_is_the_signal(ws, monkeypatch):
    """A signal landing in onnxruntime's import surfaces as ImportError("initialization
    failed") raised from it: an interrupt, not an internal error to report."""
    from qdq.errors import Interrupted

    def broken(*args, **kwargs):
        try:
            raise Interrupted(signal.SIGINT)
        except Interrupted as interrupt:
            raise ImportError("initialization failed") from interrupt

    monkeypatch.setattr("qdq.ptq.observe_holding", broken)
    result = ws.run(*quantize(ws))
    assert result.code == 128 + signal.SIGINT
    assert result.stderr == "qdq: interrupted by SIGINT; nothing was written\n"


# A signal at a set point of the console command's life, raised by the process itself.
_STARTING = """
import builtins, os, signal, sys
real = builtins.__import__
def importing(name, *args, **kwargs):
    if name == "qdq.cli":  # while numpy, onnx and ONNX Runtime load
        os.kill(os.getpid(), signal.SIGINT)
    return real(name, *args, **kwargs)
builtins.__import__ = importing
import qdq_entry
sys.argv = ["qdq", "--help"]
sys.exit(qdq_entry.main())
"""
_ENDED = """
import os, signal, sys
import qdq_entry
sys.argv = ["qdq", "inspect", sys.argv[1]]
code = qdq_entry.main()
os.kill(os.getpid(), signal.SIGINT)  # while Python tears down, the command's work done
sys.exit(code)
"""


@pytest.mark.parametrize(("script", "code"), [(_STARTING, 130), (_ENDED, 0)])
def test_the_command_owns_signals_from_its_start_to_its_exit(ws, script, code):
    """Before qdq's imports had finished a Ctrl-C gave Python's traceback; after the command
    returned, one during teardown turned a written result into 'interrupted'."""
    done = subprocess.run([sys.executable, "-c", script, str(ws.model)], capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert done.returncode == code, done.stderr
    if code:
        assert done.stderr == "qdq: interrupted by SIGINT; nothing was written\n"
    else:
        assert "Traceback" not in done.stderr
