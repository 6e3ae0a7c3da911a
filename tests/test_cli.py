"""The `qdq` command as a user runs it."""

from __future__ import annotations

import subprocess
import sys

from qdq import METHODS
from qdq.cli import main


def test_demo_reports_every_method_at_two_widths(capsys):
    assert main(["demo"]) == 0
    out = capsys.readouterr().out
    for method in METHODS:
        assert out.count(f"\n{method} ") == 2, method


def test_missing_data_is_one_line_on_stderr_and_exit_code_2(tmp_path):
    missing = tmp_path / "nope.npz"
    done = subprocess.run(
        [sys.executable, "-m", "qdq.cli", "demo", "--data", str(missing)],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0
    assert "does not exist" in done.stderr
