"""The package surface: what `import qdq` costs and exposes."""

from __future__ import annotations

import subprocess
import sys

import qdq


def test_import_does_not_pull_in_torch():
    # torch is an optional extra; a plain import must not need it (nor pay for it).
    code = "import sys, qdq; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_public_names_resolve():
    for name in qdq.__all__:
        assert getattr(qdq, name) is not None, name


def test_the_qdq_command_enters_through_the_signal_owning_module():
    """The console script runs `qdq_entry.main`, which handles signals before qdq's imports
    load (tests/fuzz/test_interrupts.py): an install that pointed at qdq.cli would lose that."""
    from importlib.metadata import entry_points

    (command,) = entry_points(group="console_scripts", name="qdq")
    assert command.value == "qdq_entry:main"
    assert callable(command.load())
