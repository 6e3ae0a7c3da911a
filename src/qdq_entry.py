"""The `qdq` console command's entry: signals handled before the first heavy import, and after
the command's outputs are in place.

Importing qdq takes numpy, onnx and ONNX Runtime (a second or more on a loaded machine): a
Ctrl-C then had given Python's traceback. And once the command has returned, its outputs are
written: a signal during the interpreter's teardown had turned a success into "interrupted".
"""

from __future__ import annotations

import os
import signal

_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def main() -> int:
    """Run `qdq` with the exit-code contract of `qdq.cli` from the first instruction on."""

    def starting(signum: int, frame: object) -> None:  # nothing has been read or written yet
        name = signal.Signals(signum).name
        os.write(2, f"qdq: interrupted by {name}; nothing was written\n".encode())
        os._exit(128 + signum)

    for s in _SIGNALS:
        signal.signal(s, starting)
    from qdq.cli import main as run  # the command installs its own handlers, and restores these

    code = run()
    for s in _SIGNALS:  # done: what it wrote stands, whatever arrives while Python exits
        signal.signal(s, signal.SIG_IGN)
    return code
