"""The exit-code contract of every command (the package's docstring): one place that turns
results, bad input, internal errors and signals into an exit code and one line on stderr."""

from __future__ import annotations

import argparse
import os
import re
import signal
import sys
import tempfile
import threading
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from qdq.errors import Interrupted, QdqError

EXIT_OK, EXIT_INTERNAL, EXIT_USAGE = 0, 1, 2
SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
PACKAGE = Path(__file__).resolve().parents[1]  # src/qdq: where a stage's frame must lie
NOTHING_KEPT = "nothing was written"  # what an interrupted command leaves, as a rule


def run_command(args: argparse.Namespace) -> int:
    """Run the parsed command; its exit code."""
    kept = getattr(args, "kept", NOTHING_KEPT)
    try:
        result = args.run(args)
    except Interrupted as interrupt:
        return interrupted(interrupt.signum, kept)
    except KeyboardInterrupt:  # where handlers cannot be installed (not the main thread)
        return interrupted(signal.SIGINT, kept)
    except (QdqError, OSError) as error:
        say(f"error: {as_flags(str(error))}")
        return EXIT_USAGE
    except Exception as error:
        cause = _interrupt_behind(error)  # onnxruntime's import fails as "initialization failed"
        return interrupted(cause.signum, kept) if cause else _internal(args, error)
    return _printed(result)


def _printed(result: str) -> int:
    """Print the command's result to stdout: exit 0, or 2 with a line saying that the command
    itself finished where stdout cannot take it (a full disk; a reader that closed its pipe
    gets nothing more, and Python's flush at exit is pointed at /dev/null so it stays quiet)."""
    try:
        print(result, flush=True)
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except OSError as error:
        say(f"error: the command finished, but its summary cannot go to stdout: {error.strerror}")
        return EXIT_USAGE
    return EXIT_OK


# The library's messages name parameters as `name`; the command line names its flags.
FLAGS = {
    "calibration": "--calib",
    "exclude": "--exclude",
    "data_free": "--data-free",
    "adaround": "--adaround",
    "target_sqnr": "--target-sqnr",
    "prefer": "--prefer",
    "saturation": "--saturation",
    "steps": "--steps",
    "lr": "--lr",
    "held_out": "--held-out",
    "patience": "--patience",
    "freeze_oscillations": "--freeze-oscillations",
    "margin_weight": "--margin-weight",
    "feature_weight": "--feature-weight",
    "class_logits": "--class-logits",
    "checkpoint_by": "--checkpoint-by",
    "batch_size": "--batch-size",
    "output_parts": "--output-parts",
    "weight_bits": "--weight-bits",
    "weight_grid": "--weight-grid",
    "max_samples": "--max-samples",
    "seed": "--seed",
    "size": "--image-size",
    "mean": "--mean",
    "std": "--std",
    "value_scale": "--value-scale",
    "layout": "--layout",
    "against": "--against",
    "inputs_from": "--inputs-from",
}


def as_flags(message: str) -> str:
    """`message` with each `parameter` the CLI has a flag for named by that flag.

    >>> as_flags("`std` must be non-zero")
    '--std must be non-zero'
    """
    return re.sub(r"`(\w+)`", lambda m: FLAGS.get(m[1], m[0]), message)


def say(message: str) -> None:
    print("qdq: " + " ".join(message.split()), file=sys.stderr)  # always one line


def interrupted(signum: int, kept: str = NOTHING_KEPT) -> int:
    say(f"interrupted by {signal.Signals(signum).name}; {kept}")
    return 128 + signum


def _interrupt_behind(error: BaseException) -> Interrupted | None:
    """The signal that an exception was raised while handling, if one was."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, Interrupted):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def _internal(args: argparse.Namespace, error: Exception) -> int:
    """Exit 1: one line naming the stage (the innermost qdq function) and the log file."""
    text = "".join(traceback.format_exception(error))
    if args.verbose:
        print(text, file=sys.stderr, end="")
    frames = traceback.extract_tb(error.__traceback__)  # cli.py's own frame comes first
    frame = [f for f in frames if Path(f.filename).is_relative_to(PACKAGE)][-1]
    module = Path(frame.filename).relative_to(PACKAGE).with_suffix("").as_posix()
    stage = f"qdq.{module.replace('/', '.')}.{frame.name}"
    with tempfile.NamedTemporaryFile("w", prefix="qdq-error-", suffix=".log", delete=False) as log:
        log.write(f"qdq {args.command}: internal error at {stage}\n{text}")
    say(
        f"internal error in {args.command} at {stage} ({type(error).__name__}: {error}); "
        f"nothing was written. The traceback is in {log.name} (-v prints it): please report it"
    )
    return EXIT_INTERNAL


@contextmanager
def signals_raised() -> Iterator[None]:
    """SIGINT, SIGTERM and SIGHUP raise Interrupted, once: a second signal while cleaning up
    is ignored, so the cleanup finishes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    fired: list[int] = []

    def handler(signum: int, frame: object) -> None:
        if not fired:
            fired.append(signum)
            raise Interrupted(signum)

    previous = {s: signal.signal(s, handler) for s in SIGNALS}
    try:
        yield
    finally:
        for s, old in previous.items():
            signal.signal(s, old)
