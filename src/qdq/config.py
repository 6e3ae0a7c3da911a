"""What the user asks for: one immutable value, with the presets as named values of it."""

from __future__ import annotations

from dataclasses import dataclass, replace

from qdq.errors import SchemeError
from qdq.observers import METHODS
from qdq.scheme import PerChannel, PerTensor, QScheme

ACTIVATION_DTYPES = ("uint8", "int8")


@dataclass(frozen=True)
class QuantConfig:
    """Settings of one quantization run; defaults are qdq's measured best (docs/ptq.md)."""

    method: str = "percentile"
    per_channel: bool = True
    weight_bits: int = 8
    activation_dtype: str = "uint8"
    symmetric_activations: bool = False
    exclude: tuple[str, ...] = ()
    bias_correction: bool = True  # fold -(W_q - W) E[x] into each bias (docs/ptq.md)
    sequential_bias_correction: bool = True  # then measured layer by layer on the int8 net
    equalize: bool = False  # cross-layer equalization of conv chains before calibration
    smoothing: bool = True  # move MatMul inputs' outlier channels into the weights (SmoothQuant)
    target_sqnr: float | None = None  # keep the most harmful layers float until this is met
    adaround: bool = False  # learn each weight's rounding (needs the torch extra)
    data_free: bool = False  # ranges from BatchNorm statistics, no calibration data
    input_range: tuple[float, float] = (-1.0, 1.0)  # the model input's range, for data-free
    batch_size: int = 16
    max_samples: int | None = None

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise SchemeError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.activation_dtype not in ACTIVATION_DTYPES:
            raise SchemeError(
                f"activation dtype must be uint8 or int8, got {self.activation_dtype!r}"
            )
        if not 2 <= self.weight_bits <= 8:
            raise SchemeError(
                f"--weight-bits {self.weight_bits} is not supported; weights are stored in int8 "
                "containers, so use 2..8"
            )
        if self.batch_size < 1:
            raise SchemeError(f"batch size must be >= 1, got {self.batch_size}")
        if self.data_free and (self.adaround or self.target_sqnr is not None):
            raise SchemeError(
                "--adaround and --target-sqnr need calibration data, "
                "so they do not combine with --data-free"
            )
        if self.input_range[0] >= self.input_range[1]:
            raise SchemeError(f"input range {self.input_range} must have LO < HI")
        if self.max_samples is not None and self.max_samples < 1:
            raise SchemeError(f"max samples must be >= 1, got {self.max_samples}")

    @property
    def activation_scheme(self) -> QScheme:
        return QScheme(
            bits=8, signed=self.activation_dtype == "int8", symmetric=self.symmetric_activations
        )

    def weight_scheme(self, axis: int | None) -> QScheme:
        granularity = PerChannel(axis) if axis is not None else PerTensor()
        return QScheme(self.weight_bits, symmetric=True, narrow_range=True, granularity=granularity)


PRESETS: dict[str, QuantConfig] = {
    "default": QuantConfig(),
    # TensorRT: symmetric int8 everywhere (zero point 0), narrow per-channel weights,
    # per-tensor activations.
    "tensorrt": QuantConfig(activation_dtype="int8", symmetric_activations=True),
}


def preset_config(name: str, **overrides: object) -> QuantConfig:
    """A preset with some fields replaced, e.g. `preset_config("tensorrt", method="kl")`."""
    if name not in PRESETS:
        raise SchemeError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return replace(PRESETS[name], **{k: v for k, v in overrides.items() if v is not None})
