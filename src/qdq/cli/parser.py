"""The command line's grammar: every command, its flags and the function that runs it."""

from __future__ import annotations

import argparse
import re
from typing import NoReturn

from qdq.cli.commands import (
    compare,
    diff,
    export_table,
    finetune,
    inspect,
    quantize,
    quantize_many,
    report,
    run,
)
from qdq.cli.contract import EXIT_USAGE
from qdq.cli.flag_groups import (
    granularity_flags,
    image_flags,
    output_parts_flag,
    pair_flags,
    report_flags,
    saturation_flag,
    worker_flags,
)
from qdq.cli.flags import at_least, finite
from qdq.config import ACTIVATION_DTYPES, CHECKPOINT_BY, RUN_PRESETS, Prefer
from qdq.lowbit import WeightGrid
from qdq.observers import METHODS


class _Parser(argparse.ArgumentParser):
    """Usage errors in one line, with where to look, and exit code 2. A value such as
    `-1e-3` (`--input-range -1e-3 1`) is a negative number, not a flag: argparse's own test
    (before Python 3.13) knew only `-1` and `-.5`, and no qdq flag looks like a number."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"qdq: error: {message}; see `{self.prog} --help`\n")


def build_parser() -> argparse.ArgumentParser:
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
    q.add_argument(
        "--preset",
        choices=list(RUN_PRESETS),
        default="default",
        help="default: the ONNX Runtime CPU recipe; tensorrt: symmetric int8 activations and Q/DQ "
        "where TensorRT expects them",
    )
    q.add_argument(
        "--method",
        choices=METHODS,
        help="activation range estimator (default best: each method's plan is tried and the "
        "one whose worst output part is closest to FP32 kept)",
    )
    granularity_flags(q)
    q.add_argument("--weight-bits", type=int, help="2..8 (default 8)")
    q.add_argument(
        "--weight-grid",
        choices=[g.value for g in WeightGrid],
        help="the values weights take: uniform (default), binary, ternary, power_of_two",
    )
    q.add_argument(
        "--activation-dtype",
        choices=ACTIVATION_DTYPES,
        help="activation codes: uint8 (default) or int8, each with a zero point",
    )
    q.add_argument(
        "--format",
        choices=("qdq", "qoperator"),
        default="qdq",
        help="qdq: Q/DQ pairs ONNX Runtime fuses; qoperator: QLinear* ops",
    )
    q.add_argument(
        "--table",
        metavar="FORMAT:FILE",
        help="also write a calibration table: tensorrt:FILE or ncnn:FILE (docs/tables.md)",
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
        "--prefer",
        choices=[p.value for p in Prefer],
        help="which candidate plan to take, each scored by its worst output part and timed in "
        "ONNX Runtime: the most accurate; balanced (default): the score less 3 dB per 10%% "
        "slower than the fastest, scores over 35 dB counted as 35; the fastest; or int8: every op "
        "the rules allow in int8, untimed (the smallest file)",
    )
    saturation_flag(q)
    q.add_argument(
        "--target-sqnr",
        type=finite,
        metavar="DB",
        help="keep the most harmful layers float until the output SQNR reaches DB",
    )
    output_parts_flag(q)
    q.add_argument(
        "--nearest-rounding",
        dest="gptq",
        action="store_false",
        default=None,
        help="round each weight to its nearest code, not for its layer's output error on the "
        "first calibration samples (GPTQ, the default)",
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
    q.add_argument(
        "--batch-size", type=at_least(1), help="samples per calibration run (default 16)"
    )
    q.add_argument("--max-samples", type=at_least(1), help="calibrate on at most this many samples")
    q.add_argument("--seed", type=at_least(0), help="pick --max-samples at random with this seed")
    q.add_argument(
        "--force", action="store_true", help="quantize a model that already holds quantized ops"
    )
    q.add_argument(
        "--report", metavar="FILE.html", help="also write the HTML report (docs/report.md)"
    )
    report_flags(q)
    image_flags(q)
    worker_flags(q)
    q.set_defaults(run=quantize)

    c = commands.add_parser("compare", help="error of a quantized model against its FP32 model")
    pair_flags(c)
    c.add_argument("--json", action="store_true", help="print JSON instead of a table")
    c.add_argument("--latency-runs", type=at_least(0), default=30, help="0 skips timing")
    output_parts_flag(c)
    image_flags(c)
    worker_flags(c)
    c.set_defaults(run=compare)

    h = commands.add_parser("report", help="HTML report: what `qdq compare` measures, drawn")
    pair_flags(h)
    h.add_argument("-o", "--output", required=True, help="the .html file to write")
    report_flags(h)
    image_flags(h)
    output_parts_flag(h)
    worker_flags(h)
    h.set_defaults(run=report)

    i = commands.add_parser("inspect", help="which nodes would be quantized, and why not")
    i.add_argument("model")
    i.add_argument(
        "--exclude",
        nargs="+",
        default=(),
        metavar="NODE_OR_OP",
        help="node names or op types to keep in float",
    )
    i.set_defaults(run=inspect)

    r = commands.add_parser("run", help="run a model on inputs, with the integer engine or ORT")
    r.add_argument("model")
    r.add_argument("--inputs", required=True, help=".npz with one array per model input")
    r.add_argument("-o", "--output", required=True, help=".npz to write the outputs to")
    r.add_argument(
        "--engine",
        choices=("integer", "ort"),
        default="integer",
        help="qdq's integer-only engine (default) or ONNX Runtime",
    )
    r.add_argument(
        "--requant",
        choices=("fixed", "float", "spec"),
        default="fixed",
        help="gemmlowp fixed point, ONNX Runtime's float32 (bit-exact), or the ONNX spec",
    )
    r.add_argument(
        "--accumulator-bits",
        type=int,
        choices=(16, 32),
        default=32,
        help="the engine's accumulator width; 16 saturates as some DSPs do (default 32)",
    )
    r.add_argument(
        "--kernels",
        choices=("auto", "numpy", "compiled"),
        default="auto",
        help="compiled (Numba, pip install 'qdq[fast]') or NumPy; auto: compiled if installed",
    )
    r.set_defaults(run=run)

    d = commands.add_parser("diff", help="where two executions of a quantized model part, by node")
    d.add_argument("model", help="the INT8 .onnx model")
    d.add_argument("--data", required=True, help="same forms as --calib")
    d.add_argument(
        "--against",
        choices=("ort", "engine", "fp32"),
        default="ort",
        help="ONNX Runtime, the engine in the other --requant mode, or float ops (QDQ models)",
    )
    d.add_argument(
        "--requant",
        choices=("fixed", "float"),
        default="float",
        help="the engine's requantization: ONNX Runtime's float32 (default) or fixed point",
    )
    d.add_argument(
        "--inputs-from",
        choices=("ort", "engine"),
        help="feed each node that side's tensors: a node's own difference, not a propagated one",
    )
    d.add_argument("--max-samples", type=at_least(1), help="use at most this many samples")
    d.add_argument("--json", action="store_true", help="print JSON instead of a table")
    d.set_defaults(run=diff)

    m = commands.add_parser("quantize-many", help="quantize the models a TOML manifest lists")
    m.add_argument("manifest", help="TOML: [defaults] and [[model]] name, model, calib, output")
    worker_flags(m)
    m.set_defaults(run=quantize_many, kept="the models done before it are kept; rerun to resume")

    t = commands.add_parser("export-table", help="calibration table of a model qdq quantized")
    t.add_argument("model", help="an INT8 .onnx model written by `qdq quantize`")
    t.add_argument(
        "--format", required=True, choices=("tensorrt", "ncnn"), help="the table's format"
    )
    t.add_argument("-o", "--output", required=True, help="where to write the table")
    t.add_argument("--ncnn-param", help="ncnn .param of the float model: its layer names")
    t.set_defaults(run=export_table)
    _finetune_command(commands)
    for command in commands.choices.values():  # -v after the command too (qdq inspect m -v)
        command.add_argument(
            "-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="as qdq -v"
        )
    return parser


def _finetune_command(commands: argparse._SubParsersAction) -> None:
    """`qdq finetune`: PTQ, then label-free QAT against the FP32 model (docs/finetune.md)."""
    f = commands.add_parser(
        "finetune", help="quantize, then fine-tune the INT8 model to match FP32 (no labels)"
    )
    f.add_argument("model", help="the FP32 .onnx model (never modified)")
    f.add_argument("-o", "--output", required=True, help="where to write the quantized model")
    f.add_argument("--calib", required=True, help="unlabelled samples, same forms as quantize's")
    f.add_argument("--steps", type=at_least(1), default=300, help="training steps (default 300)")
    f.add_argument(
        "--lr", type=finite, default=0.002, help="Adam step in grid steps per step (default 0.002)"
    )
    f.add_argument("--batch-size", type=at_least(1), default=8, help="samples per step (default 8)")
    f.add_argument(
        "--held-out",
        type=at_least(1),
        help="samples, drawn at random, that pick the checkpoint instead of training (default 1/8)",
    )
    f.add_argument(
        "--checkpoint-by",
        choices=CHECKPOINT_BY,
        help="what picks the checkpoint on the held-out samples: loss (default), or agreement: "
        "the share ranked as FP32 at every position of every class output (Softmax outputs, "
        "--class-logits) where it differs by more than its sampling noise, else the loss",
    )
    f.add_argument(
        "--patience",
        type=at_least(1),
        default=4,
        help="held-out checks (every 25 steps) without a gain, past half the steps, before "
        "stopping (default 4; more for a model whose held-out loss is noisy)",
    )
    f.add_argument(
        "--freeze-oscillations",
        type=finite,
        metavar="SHARE",
        help="hold a weight at its most frequent code once it flips back on more than this "
        "share of steps (e.g. 0.02; Nagel et al. 2022); default: never",
    )
    f.add_argument(
        "--margin-weight",
        type=finite,
        metavar="W",
        help="weight, beside KL on each Softmax output, of a term that asks the int8 model to "
        "rank FP32's top class first with room (0: off; default: the library's)",
    )
    f.add_argument(
        "--feature-weight",
        type=finite,
        metavar="W",
        help="weight, beside the outputs' loss, of the error of every quantized activation's "
        "float input against FP32's same tensor (e.g. 0.1; 0: off, the default)",
    )
    f.add_argument(
        "--class-logits",
        nargs="+",
        default=(),
        metavar="OUTPUT",
        help="outputs that hold class logits along their last axis: the margin term "
        "(--margin-weight) applies to them too, beside their squared error",
    )
    f.add_argument("--weight-bits", type=int, help="2..8 (default 8)")
    f.add_argument(
        "--weight-grid",
        choices=[g.value for g in WeightGrid],
        help="the values weights take: uniform (default), binary, ternary, power_of_two",
    )
    granularity_flags(f)
    f.add_argument(
        "--activation-dtype",
        choices=ACTIVATION_DTYPES,
        help="activation codes: uint8 (default) or int8, each with a zero point",
    )
    f.add_argument("--method", choices=METHODS, help="activation range estimator of the PTQ start")
    f.add_argument(
        "--prefer",
        choices=[p.value for p in Prefer],
        help="the PTQ plan to start from (default balanced, as quantize's)",
    )
    saturation_flag(f)
    output_parts_flag(f)
    f.add_argument(
        "--exclude",
        nargs="+",
        default=(),
        metavar="NODE_OR_OP",
        help="node names or op types to keep in float",
    )
    f.add_argument(
        "--max-samples", type=at_least(1), help="use at most this many samples (PTQ and training)"
    )
    f.add_argument("--seed", type=at_least(0), help="pick --max-samples at random with this seed")
    image_flags(f)
    f.set_defaults(run=finetune)
