"""What the user asks for: one immutable value, with the presets as named values of it.

The grids are `QScheme`s (weights, activations) taken from qdq's named schemes
(`qdq.scheme.PRESETS`), not re-encoded as loose fields; strings from the command line become
enums here, once (`Method`, `OutputFormat`), and `preset_config` turns the CLI's flags into
schemes.
"""

from __future__ import annotations

import enum
import numbers
from dataclasses import dataclass, fields, replace

import numpy as np

from qdq.errors import SchemeError, choice, expect
from qdq.lowbit import WeightGrid
from qdq.observers import Method
from qdq.scheme import (
    INT8_SYMMETRIC_ACTIVATIONS,
    INT8_WEIGHTS,
    UINT8_ACTIVATIONS,
    PerChannel,
    PerTensor,
    QScheme,
    Rounding,
)
from qdq.workers import ONE_PROCESS, Workers

ACTIVATION_DTYPES = ("uint8", "int8")
# What can pick `qdq finetune`'s checkpoint on its held-out samples (qdq.qat.finetune_trainer)
CHECKPOINT_BY = ("loss", "agreement")


class OutputFormat(enum.StrEnum):
    """How the quantized model is written: Q/DQ pairs, or ONNX Runtime's QLinear* ops."""

    QDQ = "qdq"
    QOPERATOR = "qoperator"


class Placement(enum.StrEnum):
    """Where Q/DQ pairs go: ONNX Runtime's int8 kernels (inputs and outputs of the ops it runs
    in int8), or TensorRT's explicit-quantization rules (the inputs of Conv, MatMul, Gemm and
    residual Adds; TensorRT picks every other precision). `qdq.plan.rules.RULE_SETS`."""

    ORT = "ort"
    TENSORRT = "tensorrt"


class Prefer(enum.StrEnum):
    """Which point of the accuracy-latency frontier of candidate plans to take
    (`qdq.plan.frontier`): the most accurate, the fastest that stays close to it, the fastest."""

    ACCURACY = "accuracy"
    BALANCED = "balanced"
    SPEED = "speed"
    INT8 = "int8"  # every op the rules allow, untimed: the smallest file, an int8-only target


class Saturation(enum.StrEnum):
    """Whether weights keep ONNX Runtime's int8 kernels on x86 CPUs without VNNI from clamping
    their 16-bit sums of two products (`qdq.plan.saturation`): avoid it, ignore it (a CPU with
    VNNI, an ARM CPU, TensorRT), or auto: avoid it where this machine's kernels clamp."""

    AUTO = "auto"
    AVOID = "avoid"
    IGNORE = "ignore"


@dataclass(frozen=True)
class QuantConfig:
    """Settings of one quantization run; defaults are qdq's measured best (docs/ptq.md).

    `weights` is per channel (`PerChannel`, the axis set per op: its output channels) or per
    tensor; `activations` is per tensor, 8 bits."""

    method: Method = Method.BEST  # each method's plan tried, best worst output part kept
    weights: QScheme = INT8_WEIGHTS
    weight_grid: WeightGrid = WeightGrid.UNIFORM  # binary, ternary, power-of-two (qdq.lowbit)
    activations: QScheme = UINT8_ACTIVATIONS
    exclude: tuple[str, ...] = ()
    bias_correction: bool = True  # fold -(W_q - W) E[x] into each bias (docs/ptq.md)
    sequential_bias_correction: bool = True  # then measured layer by layer on the int8 net
    equalize: bool = False  # cross-layer equalization of conv chains before calibration
    smoothing: bool = True  # move MatMul inputs' outlier channels into the weights (SmoothQuant)
    target_sqnr: float | None = None  # keep the most harmful layers float until this is met
    output_parts: tuple[str, ...] = ()  # NAME:AXIS:START-STOP,... (qdq.plan.parts.parse_parts)
    gptq: bool = True  # round weights for each layer's output error on calibration data
    adaround: bool = False  # learn each weight's rounding (needs the torch extra)
    data_free: bool = False  # ranges from BatchNorm statistics, no calibration data
    input_range: tuple[float, float] = (-1.0, 1.0)  # the model input's range, for data-free
    batch_size: int = 16
    max_samples: int | None = None
    placement: Placement = Placement.ORT
    prefer: Prefer = Prefer.BALANCED  # the candidate plan taken by accuracy and latency
    saturation: Saturation = Saturation.AUTO  # weight pairs that x86 u8s8 kernels cannot clamp
    workers: Workers = ONE_PROCESS  # where calibration shards and the budget's tasks run

    def __post_init__(self) -> None:
        object.__setattr__(self, "method", choice(Method, self.method, "calibration method"))
        object.__setattr__(self, "placement", choice(Placement, self.placement, "placement"))
        object.__setattr__(self, "prefer", choice(Prefer, self.prefer, "prefer"))
        object.__setattr__(self, "saturation", choice(Saturation, self.saturation, "saturation"))
        object.__setattr__(self, "weight_grid", choice(WeightGrid, self.weight_grid, "weight grid"))
        for name in ("weights", "activations"):
            expect(getattr(self, name), QScheme, f"`{name}`", "e.g. qdq.QScheme(bits=8)")
        for name in (f.name for f in fields(self) if f.type == "bool"):
            expect(getattr(self, name), (bool, np.bool_), f"`{name}`")
        expect(self.batch_size, numbers.Integral, "`batch_size`")
        expect(self.max_samples, (numbers.Integral, type(None)), "`max_samples`")
        expect(self.target_sqnr, (numbers.Real, type(None)), "`target_sqnr`")
        if self.target_sqnr is not None and not np.isfinite(self.target_sqnr):
            raise SchemeError(f"`target_sqnr` must be a finite dB value, got {self.target_sqnr}")
        _check_input_range(self.input_range)
        _check_weights(self.weights)
        if isinstance(self.exclude, str):  # iterated, "Conv" had excluded "C", "o", "n", "v"
            raise SchemeError(f"`exclude` is a tuple of names: write ({self.exclude!r},)")
        for name in ("exclude", "output_parts"):
            values = getattr(self, name)
            if not isinstance(values, tuple | list) or not all(isinstance(v, str) for v in values):
                raise SchemeError(f"`{name}` must be a tuple of strings, got {values!r:.80}")
        _check_activations(self.activations)
        if self.batch_size < 1:
            raise SchemeError(f"batch size must be >= 1, got {self.batch_size}")
        if self.data_free and (self.adaround or self.target_sqnr is not None or self.output_parts):
            raise SchemeError(
                "`adaround`, `target_sqnr` and `output_parts` need calibration data, "
                "so they do not combine with `data_free`"
            )
        if self.weight_grid is not WeightGrid.UNIFORM:
            _check_grid(self.weight_grid, self.weights, self.adaround)
        if self.max_samples is not None and self.max_samples < 1:
            raise SchemeError(f"max samples must be >= 1, got {self.max_samples}")

    @property
    def weight_record(self) -> str:
        """The weights' grid and bits as a file records them (`qdq.weights`): "uniform:8"."""
        return f"{self.weight_grid.value}:{self.weights.bits}"

    @property
    def per_channel(self) -> bool:
        return isinstance(self.weights.granularity, PerChannel)

    def weight_scheme(self, axis: int | None) -> QScheme:
        """The weight grid of one tensor: per channel along `axis`, or per tensor (None)."""
        granularity = PerChannel(axis) if axis is not None else PerTensor()
        return replace(self.weights, granularity=granularity)


def _check_input_range(bounds: object) -> None:
    """A (LO, HI) pair of finite numbers with LO < HI."""
    values = np.asarray(bounds) if isinstance(bounds, tuple | list | np.ndarray) else None
    real = values is not None and values.shape == (2,) and values.dtype.kind in "biuf"
    if not real or not np.isfinite(values).all():
        raise SchemeError(f"`input_range` must be two finite numbers (LO, HI), got {bounds!r:.80}")
    if values[0] >= values[1]:
        raise SchemeError(f"input range {tuple(bounds)} must have LO < HI")


def _check_weight_bits(bits: int) -> None:
    if not 2 <= bits <= 8:
        raise SchemeError(
            f"`weight_bits` {bits} is not supported; weights are stored in int8 "
            "containers, so use 2..8"
            + (" (1-bit weights: `weight_grid` binary)" if bits == 1 else "")
        )


def _check_weights(scheme: QScheme) -> None:
    _check_weight_bits(scheme.bits)
    if not isinstance(scheme.granularity, PerChannel | PerTensor):
        raise SchemeError(
            f"weights {scheme.granularity} are not supported; use PerChannel() or PerTensor()"
        )


def _check_grid(grid: WeightGrid, weights: QScheme, adaround: bool) -> None:
    if grid in (WeightGrid.BINARY, WeightGrid.TERNARY) and weights.bits != 8:
        raise SchemeError(
            f"{grid} weights are {{-1, {'' if grid is WeightGrid.BINARY else '0, '}1}} times a "
            f"scale, whatever the bits: drop `weight_bits` ({weights.bits}) for them"
        )
    if adaround:
        raise SchemeError(
            f"AdaRound learns up/down rounding on the uniform grid, not the {grid} one; "
            "drop `adaround` or use the uniform weight grid"
        )
    if not (weights.signed and weights.symmetric):
        raise SchemeError(
            f"the {grid} weight grid stores signed codes with zero point 0; "
            "use a signed symmetric weight scheme (qdq.scheme.INT8_WEIGHTS)"
        )


def _check_activations(scheme: QScheme) -> None:
    if scheme.bits != 8 or not isinstance(scheme.granularity, PerTensor):
        raise SchemeError(
            f"activations must be 8-bit per tensor (uint8 or int8), got {scheme.bits}-bit "
            f"{scheme.granularity}"
        )
    if scheme.rounding is not Rounding.HALF_EVEN:  # what qdq simulates must be what runs
        raise SchemeError(
            f"activations round half to even, as ONNX's QuantizeLinear does; got "
            f"{scheme.rounding.value} (weights may take another rounding)"
        )


# Run presets: a pair of named schemes (qdq.scheme.PRESETS) plus the pipeline's switches.
RUN_PRESETS: dict[str, QuantConfig] = {
    "default": QuantConfig(),
    # TensorRT: symmetric int8 everywhere (zero point 0), narrow per-channel weights,
    # per-tensor activations, Q/DQ where its explicit-quantization rules expect them.
    "tensorrt": QuantConfig(activations=INT8_SYMMETRIC_ACTIVATIONS, placement=Placement.TENSORRT),
}


def preset_config(
    name: str,
    *,
    per_channel: bool | None = None,
    weight_bits: int | None = None,
    activation_dtype: str | None = None,
    **overrides: object,
) -> QuantConfig:
    """A run preset with some settings replaced, e.g. `preset_config("tensorrt", method="kl")`;
    the CLI's grid flags (per channel, weight bits, activation dtype) change its schemes, and a
    None leaves the preset's value."""
    if name not in RUN_PRESETS:
        raise SchemeError(f"unknown preset {name!r}; choose one of {', '.join(RUN_PRESETS)}")
    expect(per_channel, (bool, type(None)), "`per_channel`")
    expect(weight_bits, (numbers.Integral, type(None)), "`weight_bits`")
    grids = sorted({"weights", "activations"} & set(overrides))
    if grids:  # they would replace the grid flags' schemes
        raise SchemeError(
            f"{grids} are set through per_channel, weight_bits and activation_dtype here"
        )
    config = RUN_PRESETS[name]
    weights, activations = config.weights, config.activations
    if per_channel is not None:
        weights = replace(weights, granularity=PerChannel() if per_channel else PerTensor())
    if weight_bits is not None:
        _check_weight_bits(weight_bits)
        weights = replace(weights, bits=weight_bits)
    if activation_dtype is not None:
        if activation_dtype not in ACTIVATION_DTYPES:
            raise SchemeError(f"activation dtype must be uint8 or int8, got {activation_dtype!r}")
        activations = replace(activations, signed=activation_dtype == "int8")
    changes = {k: v for k, v in overrides.items() if v is not None}
    return replace(config, weights=weights, activations=activations, **changes)
