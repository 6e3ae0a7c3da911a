"""The `qdq` command: parse, delegate, and keep one exit-code contract for every command.

0 success; 2 bad input or usage (one line: what is wrong and how to fix it); 1 internal error
(one line naming the stage and a log file holding the traceback, which -v prints); 128 + the
signal's number on SIGINT, SIGTERM or SIGHUP (130, 143, 129). Signals are raised as exceptions,
so every temporary file is removed on the way out, and nothing is written on a non-zero exit.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import tempfile
import threading
import traceback
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import NoReturn

from qdq.config import ACTIVATION_DTYPES, RUN_PRESETS, preset_config
from qdq.data import ImageOptions
from qdq.errors import Interrupted, QdqError
from qdq.flags import at_least, check_excluded, check_model_flags, check_quantize_flags, finite
from qdq.observers import METHODS

EXIT_OK, EXIT_INTERNAL, EXIT_USAGE = 0, 1, 2
SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
PACKAGE = Path(__file__).resolve().parent


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns the exit code (see the module's docstring)."""
    with _signals_raised():
        try:
            args = _parser().parse_args(argv)
            logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)
            return _run_command(args)
        except SystemExit as done:  # --help (0) or a usage error, already said in one line
            return EXIT_OK if done.code in (None, 0) else EXIT_USAGE
        except Interrupted as interrupt:  # one that landed outside the command itself
            return _interrupted(interrupt.signum)


def _run_command(args: argparse.Namespace) -> int:
    try:
        print(args.run(args))
    except Interrupted as interrupt:
        return _interrupted(interrupt.signum)
    except KeyboardInterrupt:  # where handlers cannot be installed (not the main thread)
        return _interrupted(signal.SIGINT)
    except (QdqError, OSError) as error:
        _say(f"error: {error}")
        return EXIT_USAGE
    except Exception as error:
        return _internal(args, error)
    return EXIT_OK


def _say(message: str) -> None:
    print("qdq: " + " ".join(message.split()), file=sys.stderr)  # always one line


def _interrupted(signum: int) -> int:
    _say(f"interrupted by {signal.Signals(signum).name}; nothing was written")
    return 128 + signum


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
    _say(
        f"internal error in {args.command} at {stage} ({type(error).__name__}: {error}); "
        f"nothing was written. The traceback is in {log.name} (-v prints it): please report it"
    )
    return EXIT_INTERNAL


@contextmanager
def _signals_raised() -> Iterator[None]:
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


class _Parser(argparse.ArgumentParser):
    """Usage errors in one line, with where to look, and exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"qdq: error: {message}; see `{self.prog} --help`\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="qdq", description="Quantize networks to integers.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")
    commands = parser.add_subparsers(dest="command", required=True)

    q = commands.add_parser("quantize", help="FP32 ONNX model -> INT8 model, calibrated on data")
    q.add_argument("model", help="the FP32 .onnx model (never modified)")
    q.add_argument("-o", "--output", required=True, help="where to write the quantized model")
    q.add_argument("--calib", help=".npz, .npy, or a folder of .npy or images")
    q.add_argument(
        "--data-free",
        action="store_true",
        default=None,
        help="no calibration data: ranges from BatchNorm statistics (with CLE)",
    )
    q.add_argument(
        "--input-range",
        type=finite,
        nargs=2,
        metavar=("LO", "HI"),
        help="the model input's range after preprocessing, for --data-free",
    )
    q.add_argument("--preset", choices=list(RUN_PRESETS), default="default")
    q.add_argument("--method", choices=METHODS, help="activation range estimator")
    granularity = q.add_mutually_exclusive_group()
    granularity.add_argument(
        "--per-channel",
        dest="per_channel",
        action="store_true",
        default=None,
        help="one weight scale per output channel (default)",
    )
    granularity.add_argument(
        "--per-tensor", dest="per_channel", action="store_false", help="one weight scale per tensor"
    )
    q.add_argument("--weight-bits", type=int, help="2..8 (default 8)")
    q.add_argument("--activation-dtype", choices=ACTIVATION_DTYPES)
    q.add_argument(
        "--format",
        choices=("qdq", "qoperator"),
        default="qdq",
        help="qdq: Q/DQ pairs ONNX Runtime fuses; qoperator: QLinear* ops",
    )
    q.add_argument(
        "--exclude",
        nargs="+",
        default=(),
        metavar="NODE_OR_OP",
        help="node names or op types to keep in float",
    )
    q.add_argument(
        "--equalize",
        action="store_true",
        default=None,
        help="cross-layer equalization of conv chains (helps per-tensor weights)",
    )
    q.add_argument(
        "--no-smoothing",
        dest="smoothing",
        action="store_false",
        default=None,
        help="leave MatMul inputs' outlier channels in place (no SmoothQuant)",
    )
    q.add_argument(
        "--target-sqnr",
        type=finite,
        metavar="DB",
        help="keep the most harmful layers float until the output SQNR reaches DB",
    )
    q.add_argument(
        "--adaround",
        action="store_true",
        default=None,
        help="learn up/down rounding of each weight (needs the torch extra)",
    )
    q.add_argument(
        "--no-sequential-bias-correction",
        dest="sequential_bias_correction",
        action="store_false",
        default=None,
        help="only the one-shot bias correction for weight rounding (faster, less accurate)",
    )
    q.add_argument("--batch-size", type=at_least(1))
    q.add_argument("--max-samples", type=at_least(1))
    q.add_argument("--seed", type=at_least(0), help="pick --max-samples at random with this seed")
    q.add_argument(
        "--force", action="store_true", help="quantize a model that already holds quantized ops"
    )
    _image_flags(q)
    q.set_defaults(run=_quantize)

    c = commands.add_parser("compare", help="error of a quantized model against its FP32 model")
    c.add_argument("float_model")
    c.add_argument("quantized_model")
    c.add_argument(
        "--data", required=True, help="same forms as --calib; an .npz 'label' array adds accuracy"
    )
    c.add_argument("--json", action="store_true", help="print JSON instead of a table")
    c.add_argument("--max-samples", type=at_least(1))
    c.add_argument("--latency-runs", type=at_least(0), default=30, help="0 skips timing")
    c.set_defaults(run=_compare)

    i = commands.add_parser("inspect", help="which nodes would be quantized, and why not")
    i.add_argument("model")
    i.add_argument("--exclude", nargs="+", default=(), metavar="NODE_OR_OP")
    i.set_defaults(run=_inspect)

    r = commands.add_parser("run", help="run a model on inputs, with the integer engine or ORT")
    r.add_argument("model")
    r.add_argument("--inputs", required=True, help=".npz with one array per model input")
    r.add_argument("-o", "--output", required=True, help=".npz to write the outputs to")
    r.add_argument("--engine", choices=("integer", "ort"), default="integer")
    r.add_argument("--requant", choices=("fixed", "float"), default="fixed")
    r.add_argument("--accumulator-bits", type=int, choices=(16, 32), default=32)
    r.set_defaults(run=_run)
    return parser


def _image_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("image folders")
    group.add_argument("--image-size", type=at_least(1), nargs=2, metavar=("HEIGHT", "WIDTH"))
    group.add_argument("--mean", type=finite, nargs="+", default=[0.0])
    group.add_argument("--std", type=finite, nargs="+", default=[1.0])
    group.add_argument(
        "--value-scale",
        type=finite,
        default=1 / 255,
        help="pixel multiplier before mean/std (default 1/255)",
    )
    group.add_argument("--layout", choices=("NCHW", "NHWC"), default="NCHW")
    group.add_argument("--channel-order", choices=("RGB", "BGR"), default="RGB")


def _quantize(args: argparse.Namespace) -> str:
    from qdq.pipeline import quantize_model

    check_quantize_flags(args)
    check_model_flags(args.model, args.exclude, args.force)
    config = preset_config(
        args.preset,
        method=args.method,
        per_channel=args.per_channel,
        weight_bits=args.weight_bits,
        activation_dtype=args.activation_dtype,
        exclude=tuple(args.exclude) or None,
        equalize=args.equalize,
        smoothing=args.smoothing,
        target_sqnr=args.target_sqnr,
        adaround=args.adaround,
        sequential_bias_correction=args.sequential_bias_correction,
        data_free=args.data_free,
        input_range=tuple(args.input_range) if args.input_range else None,
        batch_size=args.batch_size,
        max_samples=args.max_samples,
    )
    images = ImageOptions(
        size=tuple(args.image_size) if args.image_size else None,
        mean=tuple(args.mean),
        std=tuple(args.std),
        value_scale=args.value_scale,
        layout=args.layout,
        channel_order=args.channel_order,
    )
    report = quantize_model(
        args.model,
        args.output,
        args.calib,
        config,
        images,
        args.seed,
        progress=sys.stderr.isatty(),
        output_format=args.format,
    )
    return report.summary(args.output)


def _compare(args: argparse.Namespace) -> str:
    from qdq.report.compare import compare_models

    result = compare_models(
        args.float_model,
        args.quantized_model,
        args.data,
        max_samples=args.max_samples,
        latency_runs=args.latency_runs,
    )
    return result.to_json() if args.json else result.to_text()


def _inspect(args: argparse.Namespace) -> str:
    from qdq.config import QuantConfig
    from qdq.pipeline import inspect_model

    decisions = inspect_model(args.model, QuantConfig(exclude=tuple(args.exclude)))
    check_excluded(args.exclude, {n for d in decisions for n in (d.node, d.op_type)})
    width = max(len(d.node) for d in decisions)
    lines = [f"{'node':<{width}}  {'op':<20} decision"]
    for d in decisions:
        verdict = ("int8: " if d.quantized else "float: ") + d.reason
        lines.append(f"{d.node:<{width}}  {d.op_type:<20} {verdict}")
    quantized = sum(d.quantized for d in decisions)
    lines.append(f"{quantized} of {len(decisions)} nodes quantizable")
    return "\n".join(lines)


def _run(args: argparse.Namespace) -> str:
    from qdq.engine.cli import run_command

    return run_command(
        args.model, args.inputs, args.output, args.engine, args.requant, args.accumulator_bits
    )


if __name__ == "__main__":
    sys.exit(main())
