"""What each command does once its flags are parsed: check them, delegate, say what was made."""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from qdq.cli.flags import (
    check_in_order,
    check_model_flags,
    check_quantize_flags,
)
from qdq.config import preset_config
from qdq.data import ImageOptions
from qdq.errors import UsageError
from qdq.outputs import replaced_together
from qdq.workers import Workers

if TYPE_CHECKING:
    from qdq.plan.decisions import Decision
    from qdq.report.summary import QuantizeReport


def _workers(args: argparse.Namespace) -> Workers:
    return Workers(count=args.workers, ray=args.ray)


def quantize(args: argparse.Namespace) -> str:
    from qdq.pipeline import quantize_model

    check_quantize_flags(args)
    check_model_flags(args.model, args.exclude, args.force)
    html = _report_flag(args)
    table = _table_flag(args)
    config = preset_config(
        args.preset,
        method=args.method,
        per_channel=args.per_channel,
        weight_bits=args.weight_bits,
        weight_grid=args.weight_grid,
        activation_dtype=args.activation_dtype,
        exclude=tuple(args.exclude) or None,
        equalize=args.equalize,
        smoothing=False if table else args.smoothing,  # a table describes the float tensors
        target_sqnr=args.target_sqnr,
        prefer=args.prefer,
        saturation=args.saturation,
        output_parts=tuple(args.output_parts) or None,
        gptq=args.gptq,
        adaround=args.adaround,
        sequential_bias_correction=args.sequential_bias_correction,
        data_free=args.data_free,
        input_range=tuple(args.input_range) if args.input_range else None,
        batch_size=args.batch_size,
        max_samples=args.max_samples,
        workers=_workers(args),
    )
    outputs = [Path(args.output), *([Path(table[1])] if table else []), *([html] if html else [])]
    with replaced_together(outputs):  # one result: all of them, or none (and the old ones kept)
        report = quantize_model(
            args.model,
            args.output,
            args.calib,
            config,
            _images(args),
            args.seed,
            progress=sys.stderr.isatty(),
            output_format=args.format,
        )
        if table:
            from qdq.report.tables import write_table

            write_table(args.output, table[1], table[0], flag="--table")
        summary = report.summary(args.output)
        if html:
            summary += "\n" + _write_html(
                args, args.model, args.output, args.calib, html, report.decisions, report
            )
    return summary


def finetune(args: argparse.Namespace) -> str:
    from qdq.qat.finetune import FinetuneOptions, finetune_model  # UsageError without torch

    check_model_flags(args.model, args.exclude, None)  # fine-tuning has no --force
    config = preset_config(
        "default",
        method=args.method,
        per_channel=args.per_channel,
        weight_bits=args.weight_bits,
        weight_grid=args.weight_grid,
        activation_dtype=args.activation_dtype,
        exclude=tuple(args.exclude) or None,
        prefer=args.prefer,
        saturation=args.saturation,
        output_parts=tuple(args.output_parts) or None,
        batch_size=args.batch_size,
        max_samples=args.max_samples,
    )
    options = FinetuneOptions(
        steps=args.steps,
        lr=args.lr,
        batch_size=args.batch_size,
        held_out=args.held_out,
        patience=args.patience,
        freeze_oscillations=args.freeze_oscillations,
        **({} if args.margin_weight is None else {"margin_weight": args.margin_weight}),
        **({} if args.feature_weight is None else {"feature_weight": args.feature_weight}),
        class_logits=tuple(args.class_logits),
        **({} if args.checkpoint_by is None else {"checkpoint_by": args.checkpoint_by}),
    )
    report = finetune_model(
        args.model,
        args.output,
        args.calib,
        config,
        options,
        _images(args),
        args.seed,
        progress=sys.stderr.isatty(),
    )
    return report.summary(args.output)


def _images(args: argparse.Namespace) -> ImageOptions:
    return ImageOptions(
        size=tuple(args.image_size) if args.image_size else None,
        mean=tuple(args.mean),
        std=tuple(args.std),
        value_scale=args.value_scale,
        layout=args.layout,
        channel_order=args.channel_order,
    )


def quantize_many(args: argparse.Namespace) -> str:
    from qdq.zoo import quantize_many, read_manifest, summary_table

    outcomes = quantize_many(read_manifest(args.manifest), _workers(args))
    failed = [o.name for o in outcomes if o.status.startswith("failed")]
    if failed:  # the table still says what became of each; the exit code says not all did
        print(summary_table(outcomes))
        raise UsageError(
            f"{len(failed)} of {len(outcomes)} models failed: {', '.join(failed)} (the table "
            "says why); fix them and run again: the done ones are skipped"
        )
    return summary_table(outcomes)


def _table_flag(args: argparse.Namespace) -> tuple[str, str] | None:
    """--table FORMAT:FILE as (format, file), the file checked before any work."""
    if args.table is None:
        return None
    from qdq.outputs import check_output

    table_format, _, file = args.table.partition(":")
    if table_format not in ("tensorrt", "ncnn") or not file:
        raise UsageError(f"--table {args.table!r}: give tensorrt:FILE or ncnn:FILE")
    if Path(file).resolve() == Path(args.output).resolve():
        raise UsageError(f"--table {file} is the -o model; give the table its own file")
    if getattr(args, "format", "qdq") == "qoperator":
        raise UsageError("--table reads the Q/DQ pairs: drop --format qoperator, or --table")
    grid = getattr(args, "weight_grid", None) or "uniform"
    bits = getattr(args, "weight_bits", None) or 8
    low = [f"--weight-bits {bits}"] if bits < 8 else []
    if grid != "uniform":
        low.append(f"--weight-grid {grid}")
    if table_format == "ncnn" and low:
        raise UsageError(
            "--table ncnn: ncnn's int8 layers quantize their float weights to 8-bit uniform "
            f"codes themselves, so no ncnn table carries {' and '.join(low)}; drop it, or "
            "ask for a tensorrt table (activations only)"
        )
    check_output(file, [args.model, args.calib], "--table")
    return table_format, file


def export_table(args: argparse.Namespace) -> str:
    from qdq.report.tables import write_table

    if args.ncnn_param is not None and args.format != "ncnn":
        raise UsageError("--ncnn-param names ncnn's layers: give it with --format ncnn only")
    target = write_table(args.model, args.output, args.format, args.ncnn_param)
    return f"wrote {target}: {args.format} calibration table of {args.model}"


def compare(args: argparse.Namespace) -> str:
    from qdq.report.compare import compare_models

    check_in_order(args.float_model, args.quantized_model)
    result = compare_models(
        args.float_model,
        args.quantized_model,
        args.data,
        max_samples=args.max_samples,
        latency_runs=args.latency_runs,
        workers=_workers(args),
        declared=args.output_parts,
        images=_images(args),
    )
    return result.to_json() if args.json else result.to_text()


def _report_flag(args: argparse.Namespace) -> Path | None:
    """--report FILE.html, checked before any work; it measures on --calib as quantize read it."""
    if args.report is None:
        return None
    from qdq.outputs import check_output

    if args.calib is None:
        raise UsageError(
            "--report measures on the calibration data; give --calib, or drop --report"
        )
    if Path(args.report).resolve() == Path(args.output).resolve():
        raise UsageError(f"--report {args.report} is the -o model; give the report its own file")
    table = args.table.partition(":")[2] if args.table else ""
    if table and Path(args.report).resolve() == Path(table).resolve():
        raise UsageError(f"--report {args.report} is the --table file; give each its own file")
    return check_output(args.report, [args.model, args.calib], "--report")


def report(args: argparse.Namespace) -> str:
    from qdq.outputs import check_output
    from qdq.pipeline import inspect_model

    check_in_order(args.float_model, args.quantized_model)
    target = check_output(args.output, [args.float_model, args.quantized_model, args.data])
    decisions = inspect_model(args.float_model)  # the reasons; the INT8 model says which held
    return _write_html(args, args.float_model, args.quantized_model, args.data, target, decisions)


def _write_html(
    args: argparse.Namespace,
    float_model: str,
    quantized_model: str,
    data: str,
    target: Path,
    decisions: list[Decision],
    run: QuantizeReport | None = None,
) -> str:
    """Measure and write the HTML report (with how `run`, the quantize run that wrote the INT8
    model, chose its plan); the line the command prints about it."""
    from qdq.report.html import write_report
    from qdq.report.measure import measure

    measured = measure(
        float_model,
        quantized_model,
        data,
        decisions,
        max_samples=args.max_samples,
        everything=args.all_charts,
        sensitivity=args.sensitivity,
        workers=_workers(args),
        images=_images(args),
        declared=args.output_parts,
    )
    size = write_report(replace(measured, run=run), target)
    return f"wrote {target}: HTML report, {size / 1e6:.1f} MB, opens offline"


def inspect(args: argparse.Namespace) -> str:
    from qdq.config import QuantConfig
    from qdq.pipeline import inspect_model
    from qdq.plan.decisions import PENDING

    check_model_flags(args.model, args.exclude, True)  # the names quantize takes
    decisions = inspect_model(args.model, QuantConfig(exclude=tuple(args.exclude)))
    width = max((len(d.node) for d in decisions), default=4)
    lines = [f"{'node':<{width}}  {'op':<20} decision"]
    pending = [d for d in decisions if d.quantized and d.reason == PENDING]
    for d in decisions:
        verdict = d.reason if d in pending else ("int8: " if d.quantized else "float: ") + d.reason
        lines.append(f"{d.node:<{width}}  {d.op_type:<20} {verdict}")
    quantized = sum(d.quantized for d in decisions) - len(pending)
    lines.append(
        f"{quantized} of {len(decisions)} nodes quantizable"
        + (f", {len(pending)} more where int8 flows into them" if pending else "")
    )
    return "\n".join(lines)


def diff(args: argparse.Namespace) -> str:
    from qdq.engine.diff import diff_model

    result = diff_model(
        args.model,
        args.data,
        against=args.against,
        requant=args.requant,
        inputs_from=args.inputs_from,
        max_samples=args.max_samples,
    )
    return result.to_json() if args.json else result.to_text()


def run(args: argparse.Namespace) -> str:
    from qdq.engine.cli import run_command

    return run_command(
        args.model,
        args.inputs,
        args.output,
        args.engine,
        args.requant,
        args.accumulator_bits,
        args.kernels,
    )
