"""What a quantized tensor looks like: one immutable, validated value (docs/quantization.md, §1-§6).

A scheme says how reals map to integers; it holds no numbers from data. Ranges (from observers)
and a scheme together give the scale and zero point (`qdq.qparams.choose_qparams`).
"""

from __future__ import annotations

import enum
import numbers
from dataclasses import dataclass, field

import numpy as np

from qdq.errors import SchemeError, expect

MIN_BITS = 2
MAX_BITS = 16


class Rounding(enum.Enum):
    """How `x / scale` becomes an integer; ties are where the policies differ.

    2.5 -> 2, 3, 3 and -2.5 -> -2, -3, -2 under HALF_EVEN, HALF_AWAY, HALF_UP.
    """

    HALF_EVEN = "half_even"  # ONNX QuantizeLinear, numpy.rint: unbiased
    HALF_AWAY = "half_away"  # C round(), TFLite's reference kernels
    HALF_UP = "half_up"  # floor(x + 0.5): cheapest in hardware


@dataclass(frozen=True)
class PerTensor:
    """One scale and zero point for the whole tensor: W (64, 3, 3, 3) -> scale shape ()."""


@dataclass(frozen=True)
class PerChannel:
    """One scale per slice along `axis`: W (64, 3, 3, 3), axis=0 -> scale shape (64,)."""

    axis: int = 0

    def __post_init__(self) -> None:
        expect(self.axis, numbers.Integral, "PerChannel's axis")


@dataclass(frozen=True)
class PerBlock:
    """One scale per `block_size` run along `axis` (ONNX opset 21 blocked quantization).

    W (64, 256), axis=1, block_size=32 -> scale shape (64, 8); a short last block is allowed.
    """

    axis: int
    block_size: int

    def __post_init__(self) -> None:
        expect(self.axis, numbers.Integral, "PerBlock's axis")
        expect(self.block_size, numbers.Integral, "PerBlock's block_size")


Granularity = PerTensor | PerChannel | PerBlock


@dataclass(frozen=True)
class QScheme:
    """An integer grid for reals: `real = scale * (q - zero_point)` (eq. 1).

    >>> s = QScheme(bits=8, signed=True, symmetric=True, narrow_range=True)
    >>> (s.qmin, s.qmax)
    (-127, 127)
    """

    bits: int = 8
    signed: bool = True
    symmetric: bool = False
    granularity: Granularity = field(default_factory=PerTensor)
    narrow_range: bool = False
    power_of_two_scale: bool = False
    rounding: Rounding = Rounding.HALF_EVEN

    def __post_init__(self) -> None:
        if isinstance(self.bits, bool) or not isinstance(self.bits, int | np.integer):
            raise SchemeError(f"bits must be an integer, got {self.bits!r}")
        if not MIN_BITS <= self.bits <= MAX_BITS:
            raise SchemeError(
                f"bits={self.bits} is outside the supported {MIN_BITS}..{MAX_BITS}; "
                "use 8 for int8, 4 for int4, 16 for int16"
            )
        for name in ("signed", "symmetric", "narrow_range", "power_of_two_scale"):
            expect(getattr(self, name), (bool, np.bool_), name)
        if not isinstance(self.granularity, PerTensor | PerChannel | PerBlock):
            raise SchemeError(
                f"granularity must be PerTensor(), PerChannel(axis) or PerBlock(axis, block_size), "
                f"got {self.granularity!r}"
            )
        if isinstance(self.granularity, PerBlock) and self.granularity.block_size < 1:
            raise SchemeError(
                f"block_size must be >= 1, got {self.granularity.block_size}; "
                "ONNX blocked quantization typically uses 32, 64 or 128"
            )
        if not isinstance(self.rounding, Rounding):
            raise SchemeError(f"rounding must be a qdq.Rounding, got {self.rounding!r}")
        if self.narrow_range and not self.signed:
            raise SchemeError(
                "narrow_range drops the most negative code (int8 [-127, 127]) and applies to "
                "signed schemes only; set signed=True or narrow_range=False"
            )
        if self.power_of_two_scale and not self.symmetric:
            raise SchemeError(
                "power_of_two_scale (dynamic fixed point) needs a zero point fixed by the scheme; "
                "set symmetric=True or power_of_two_scale=False"
            )

    @property
    def qmin(self) -> int:
        """Smallest code: -2^(b-1) (+1 when narrow) signed, 0 unsigned (eq. 4)."""
        if not self.signed:
            return 0
        return -(1 << (self.bits - 1)) + int(self.narrow_range)

    @property
    def qmax(self) -> int:
        """Largest code: 2^(b-1) - 1 signed, 2^b - 1 unsigned (eq. 4)."""
        return (1 << (self.bits - 1)) - 1 if self.signed else (1 << self.bits) - 1

    @property
    def storage_dtype(self) -> np.dtype:
        """Smallest NumPy integer type that holds every code (int8 holds int2..int8)."""
        width = 8 if self.bits <= 8 else 16
        return np.dtype(f"{'int' if self.signed else 'uint'}{width}")


INT8_WEIGHTS = QScheme(bits=8, symmetric=True, narrow_range=True, granularity=PerChannel(0))
INT4_WEIGHTS = QScheme(bits=4, symmetric=True, narrow_range=True, granularity=PerChannel(0))
UINT8_ACTIVATIONS = QScheme(bits=8, signed=False)
INT8_ACTIVATIONS = QScheme(bits=8, signed=True)
INT8_SYMMETRIC_ACTIVATIONS = QScheme(bits=8, symmetric=True)
INT16_ACTIVATIONS = QScheme(bits=16, symmetric=True)
INT8_POWER_OF_TWO = QScheme(bits=8, symmetric=True, power_of_two_scale=True)

PRESETS: dict[str, QScheme] = {
    "int8_weights": INT8_WEIGHTS,
    "int4_weights": INT4_WEIGHTS,
    "uint8_activations": UINT8_ACTIVATIONS,
    "int8_activations": INT8_ACTIVATIONS,
    "int8_symmetric_activations": INT8_SYMMETRIC_ACTIVATIONS,
    "int16_activations": INT16_ACTIVATIONS,
    "int8_power_of_two": INT8_POWER_OF_TWO,
}


def preset(name: str) -> QScheme:
    """The named scheme, e.g. `preset("int8_weights")`; raises SchemeError naming the choices."""
    try:
        return PRESETS[name]
    except KeyError:
        raise SchemeError(
            f"unknown preset {name!r}; choose one of {', '.join(sorted(PRESETS))}"
        ) from None
