"""The `qdq` command: parse, delegate, and keep one exit-code contract for every command.

0 success; 2 bad input or usage (one line: what is wrong and how to fix it); 1 internal error
(one line naming the stage and a log file holding the traceback, which -v prints); 128 + the
signal's number on SIGINT, SIGTERM or SIGHUP (130, 143, 129). Signals are raised as exceptions,
so every temporary file is removed on the way out, and nothing is written on a non-zero exit.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from qdq.cli.contract import (
    EXIT_OK,
    EXIT_USAGE,
    interrupted,
    run_command,
    signals_raised,
)
from qdq.cli.parser import build_parser
from qdq.errors import Interrupted


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns the exit code (see the module's docstring)."""
    with signals_raised():
        try:
            args = build_parser().parse_args(argv)
            logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)
            return run_command(args)
        except SystemExit as done:  # --help (0) or a usage error, already said in one line
            return EXIT_OK if done.code in (None, 0) else EXIT_USAGE
        except Interrupted as interrupt:  # one that landed outside the command itself
            return interrupted(interrupt.signum)
