"""Flag groups that several commands share (the data a pair of models runs on, the report's
charts, weight granularity, saturation, output parts, workers, image folders), so that each
reads the same on every command that takes it."""

from __future__ import annotations

import argparse

from qdq.cli.flags import at_least, finite
from qdq.config import Saturation


def pair_flags(parser: argparse.ArgumentParser) -> None:
    """The FP32 model, its quantized model and the data both run on (compare, report)."""
    parser.add_argument("float_model")
    parser.add_argument("quantized_model")
    parser.add_argument(
        "--data", required=True, help="same forms as --calib; an .npz 'label' array adds accuracy"
    )
    parser.add_argument("--max-samples", type=at_least(1), help="use at most this many samples")


def report_flags(parser: argparse.ArgumentParser) -> None:
    """The HTML report's options (quantize, report)."""
    group = parser.add_argument_group("HTML report")
    group.add_argument(
        "--all-charts", action="store_true", help="every activation and weight, not the 12 worst"
    )
    group.add_argument(
        "--sensitivity",
        action="store_true",
        help="per layer, the output SQNR gain when it alone reads float (a session per layer)",
    )


def granularity_flags(parser: argparse.ArgumentParser) -> None:
    """--per-channel or --per-tensor weight scales."""
    granularity = parser.add_mutually_exclusive_group()
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


def saturation_flag(parser: argparse.ArgumentParser) -> None:
    """--saturation: whether weights avoid the 16-bit pair sums of x86 kernels without VNNI."""
    parser.add_argument(
        "--saturation",
        choices=[s.value for s in Saturation],
        help="ONNX Runtime's int8 kernels on x86 CPUs without VNNI add two products in 16 bits, "
        "which clamps; avoid: raise a weight channel's scale until no pair of its products can, "
        "for the activations calibration saw (7-bit weights, the usual remedy, cost 6 dB); "
        "ignore: for a CPU with VNNI, ARM or TensorRT; auto (default): avoid where this "
        "machine's kernels clamp",
    )


def output_parts_flag(parser: argparse.ArgumentParser) -> None:
    """--output-parts: the quantities an output joins, judged apart."""
    parser.add_argument(
        "--output-parts",
        nargs="+",
        default=(),
        metavar="NAME:AXIS:START-STOP,...",
        help="the quantities an output joins, judged apart (e.g. output0:1:0-4,4-22: a "
        "detector's boxes and scores); found from the data when not given",
    )


def worker_flags(parser: argparse.ArgumentParser) -> None:
    """--workers or --ray: where calibration, evaluation and searches run."""
    where = parser.add_mutually_exclusive_group()
    where.add_argument(
        "--workers",
        type=at_least(1),
        default=1,
        metavar="N",
        help="local worker processes for calibration, evaluation and the accuracy search",
    )
    where.add_argument(
        "--ray", metavar="ADDRESS", help="run those on a Ray cluster: auto, or its address"
    )


def image_flags(parser: argparse.ArgumentParser) -> None:
    """How image files become the model's input."""
    group = parser.add_argument_group("image folders")
    group.add_argument(
        "--image-size",
        type=at_least(1),
        nargs=2,
        metavar=("HEIGHT", "WIDTH"),
        help="resize every image to this (default: the model input's size)",
    )
    group.add_argument(
        "--mean", type=finite, nargs="+", default=[0.0], help="subtracted per channel (default 0)"
    )
    group.add_argument(
        "--std", type=finite, nargs="+", default=[1.0], help="divides per channel (default 1)"
    )
    group.add_argument(
        "--value-scale",
        type=finite,
        default=1 / 255,
        help="pixel multiplier before mean/std (default 1/255)",
    )
    group.add_argument(
        "--layout", choices=("NCHW", "NHWC"), default="NCHW", help="the model input's layout"
    )
    group.add_argument(
        "--channel-order",
        choices=("RGB", "BGR"),
        default="RGB",
        help="the model's channel order (default RGB)",
    )
