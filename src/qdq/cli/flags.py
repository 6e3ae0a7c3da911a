"""Command-line values checked at the edge: numbers that mean something, flags that go together,
names that exist in the model. Each refusal says what is wrong and how to fix it."""

from __future__ import annotations

import argparse
import difflib
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError

from qdq.errors import UsageError

# Ops that only a quantized model holds: quantizing it again would round twice.
QUANTIZED_OPS = {
    "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "ConvInteger",
    "MatMulInteger", "QGemm", "QAttention", "DynamicQuantizeMatMul", "MatMulNBits",
}  # fmt: skip


def at_least(low: int) -> Callable[[str], int]:
    """An argparse type: an integer >= `low`."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {value}")
        return value

    parse.__name__ = f"integer >= {low}"
    return parse


def finite(text: str) -> float:
    """An argparse type: a finite number (no nan, no inf)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


def check_quantize_flags(args: argparse.Namespace) -> None:
    """Flags of `qdq quantize` that only work together."""
    if args.input_range is not None:
        if not args.data_free:
            raise UsageError(
                "--input-range only applies with --data-free; add --data-free, or drop "
                "--input-range"
            )
        low, high = args.input_range
        if low >= high:
            raise UsageError(f"--input-range LO HI needs LO < HI, got {low:g} {high:g}")
    if args.data_free:
        unread = [
            flag
            for flag, given in (
                ("--prefer", args.prefer not in (None, "int8")),
                ("--output-parts", bool(args.output_parts)),
                ("--nearest-rounding", args.gptq is False),
                ("--no-smoothing", args.smoothing is False),
                ("--no-sequential-bias-correction", args.sequential_bias_correction is False),
            )
            if given
        ]
        if unread:
            one = len(unread) == 1
            raise UsageError(
                f"{', '.join(unread)} {'does' if one else 'do'} nothing with --data-free (it "
                "plans every layer from BatchNorm statistics: no candidate plans, checks or "
                f"calibration steps); drop {'it' if one else 'them'} or --data-free"
            )
    if args.preset == "tensorrt":
        clash = (
            "--activation-dtype uint8"
            if args.activation_dtype == "uint8"
            else "--format qoperator"
            if getattr(args, "format", "qdq") == "qoperator"
            else None
        )
        if clash:
            raise UsageError(
                f"--preset tensorrt writes Q/DQ pairs of symmetric int8 (zero point 0), which "
                f"TensorRT parses, and {clash} writes neither; drop {clash} or the preset"
            )
    low_bit = (args.weight_bits or 8) < 8 or args.weight_grid not in (None, "uniform")
    if args.prefer not in (None, "int8") and (
        args.target_sqnr is not None or args.preset == "tensorrt" or low_bit
    ):
        other = (
            "--target-sqnr"
            if args.target_sqnr is not None
            else "--preset tensorrt"
            if args.preset == "tensorrt"
            else "--weight-bits below 8 or --weight-grid"
        )
        raise UsageError(
            f"--prefer picks among candidate plans timed in ONNX Runtime, which {other} does "
            f"not use; drop --prefer or {other}"
        )


def check_model_flags(model_path: str, exclude: Sequence[str], force: bool | None) -> None:
    """Refuse an already-quantized model (unless `force`; None: the command has no --force)
    and --exclude names that match no node or op type. A model that does not parse is left
    for the loader to report."""
    model = _graph(model_path)
    if model is None:
        return
    quantized = sorted({n.op_type for n in model.graph.node} & QUANTIZED_OPS)
    if quantized and not force:
        raise UsageError(
            f"{model_path} is already quantized (it holds {', '.join(quantized)}); quantizing "
            "it again rounds twice: give the FP32 model"
            + (", or pass --force" if force is not None else "")
        )
    known = {n.name for n in model.graph.node} | {n.op_type for n in model.graph.node}
    unknown = [name for name in exclude if name not in known]
    if unknown:
        check_excluded(unknown, _prepared_names(model_path) | known)


def check_in_order(float_model: str, quantized_model: str) -> None:
    """Refuse a comparison whose FP32 model holds quantized ops where the INT8 one holds none:
    the two were given the wrong way round (compare had measured an int8 reference)."""
    first, second = _graph(float_model), _graph(quantized_model)
    if first is None or second is None:
        return
    ops = [{n.op_type for n in m.graph.node} & QUANTIZED_OPS for m in (first, second)]
    if ops[0] and not ops[1]:
        raise UsageError(
            f"{float_model} holds quantized ops ({', '.join(sorted(ops[0]))}) and "
            f"{quantized_model} none: give the FP32 model first, then the INT8 one"
        )


def _graph(path: str) -> onnx.ModelProto | None:
    """The model at `path` without its external weights, or None where it is no readable
    file (the loader then says what is wrong; a FIFO would block here)."""
    if not Path(path).is_file():
        return None
    try:
        return onnx.load(path, load_external_data=False)
    except (DecodeError, ValueError, RuntimeError, OSError):
        return None


def check_excluded(exclude: Sequence[str], known: set[str]) -> None:
    """Every --exclude name is a node or an op type in `known`; the error lists near misses."""
    for name in exclude:
        if name not in known:
            near = difflib.get_close_matches(name, sorted(known), n=3, cutoff=0.6)
            hint = f"did you mean {', '.join(near)}?" if near else "`qdq inspect` lists them"
            raise UsageError(f"--exclude {name!r} names no node or op type of the model; {hint}")


def _prepared_names(model_path: str) -> set[str]:
    """Node names as `qdq inspect` shows them (after preparation names the unnamed nodes), and
    as reports name the nodes inside Ifs (`qdq.passes.branches.inlined_names`)."""
    from qdq.onnx.model import load_model
    from qdq.passes.branches import inlined_names
    from qdq.pipeline import prepare

    prepared, _, _ = prepare(load_model(model_path), per_channel=True)
    names = {n for node in prepared.graph.node for n in (node.name, node.op_type)}
    return names | inlined_names(prepared.graph)
