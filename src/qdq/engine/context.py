"""What every integer kernel shares: the run's `Context` (its settings, the accumulators it
observed, prepared weights and reused arrays), the `Kernel` signature, and the readers of a
node's optional inputs and zero points. Kept apart from the op families (`quantize_kernels`,
`product_kernels`, `real_value_kernels`, `code_kernels`), which all build on it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from qdq.engine.integer import (
    INT16,
    Accumulator,
    exact_conv,
    exact_matmul,
    requantize_output,
    saturating_conv16,
    saturating_matmul16,
)
from qdq.fixedpoint import quantize_multiplier
from qdq.onnx.conv import ConvGeometry

# How a 32-bit accumulator becomes the output code: the fixed-point multiplier M0 * 2^-n
# (gemmlowp/TFLite), ONNX Runtime's float32 arithmetic (MLAS), or the ONNX definition read
# literally in float64 (docs/engine.md, "Requantization").
Requant = Literal["fixed", "float", "spec"]


@dataclass
class Context:
    """Settings of one run and what it observed per node."""

    requant: Requant = "fixed"
    accumulator_bits: int = 32
    accumulators: dict[str, Accumulator] = field(default_factory=dict)
    multipliers: dict[bytes, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    node: str = ""
    compiled: bool = False  # the Numba kernels (`engine/compiled.py`), else NumPy's
    weights: dict[int, tuple] = field(default_factory=dict)  # per position: prepared constants
    position: int = -1  # the node's place in the graph
    # per (position, slot): the compiled kernels' result arrays of the last run, reused
    # (`Engine.run`); None: fresh arrays
    buffers: dict[tuple[int, str], np.ndarray] | None = None

    def empty(self, shape: tuple[int, ...], dtype: np.dtype, slot: str = "out") -> np.ndarray:
        """An uninitialized array for the node's `slot`: the one it had in the engine's last
        run where `buffers` keeps them, so that a run touches memory it already holds (fresh
        memory costs a page fault per 4 KiB on first write: 40% of PP-OCR's classifier's run)."""
        if self.buffers is None:
            return np.empty(shape, dtype)
        key = (self.position, slot)
        buffer = self.buffers.get(key)
        if buffer is None or buffer.shape != tuple(shape) or buffer.dtype != dtype:
            buffer = self.buffers[key] = np.empty(shape, dtype)
        return buffer

    def requantize(
        self, acc: np.ndarray, multiplier: np.ndarray, zero_point: np.ndarray, dtype: np.dtype
    ) -> np.ndarray:
        """Output codes from the accumulator; in fixed mode `(m0, shift)` is computed once per
        distinct multiplier and kept (the engine passes the same dict to every run)."""
        fixed = None
        if self.requant == "fixed":
            real = np.asarray(multiplier, dtype=np.float64)
            key = real.tobytes() + str(real.shape).encode()
            if key not in self.multipliers:
                self.multipliers[key] = quantize_multiplier(real)
            fixed = self.multipliers[key]
        return requantize_output(acc, multiplier, zero_point, dtype, self.requant, fixed)

    def accumulate_count(self, size: int) -> None:
        """Count `size` accumulations known to fit (the compiled path's bound)."""
        self.accumulators.setdefault(self.node, Accumulator(self.accumulator_bits)).total += size

    def accumulate(self, acc: np.ndarray) -> np.ndarray:
        """The node's int accumulator through the simulated hardware accumulator."""
        meter = self.accumulators.setdefault(self.node, Accumulator(self.accumulator_bits))
        return meter.clamp(acc)

    def conv(
        self, x: np.ndarray, w: np.ndarray, g: ConvGeometry, bias: np.ndarray | None
    ) -> np.ndarray:
        """The accumulator of a convolution of centred codes plus the bias: exact, then through
        a 32-bit accumulator; or summed as a 16-bit datapath does (`saturating_conv16`)."""
        shape = (1, -1, 1, 1)
        if self.accumulator_bits == 16:
            return self._saturate(*saturating_conv16(x, w, g), bias, shape)
        acc = exact_conv(x, w, g)
        return self.accumulate(acc if bias is None else acc + bias.astype(np.int64).reshape(shape))

    def matmul(self, a: np.ndarray, b: np.ndarray, bias: np.ndarray | None = None) -> np.ndarray:
        """`conv` for a matrix product of centred codes (a bias broadcasts like numpy's +)."""
        if self.accumulator_bits == 16:
            return self._saturate(*saturating_matmul16(a, b), bias, None)
        acc = exact_matmul(a, b)
        return self.accumulate(acc if bias is None else acc + bias.astype(np.int64))

    def _saturate(self, acc, saturated, bias, shape) -> np.ndarray:
        """A saturating sum's result with the bias added last (saturating too), recorded."""
        if bias is not None:
            acc = acc + (bias.astype(np.int64) if shape is None else bias.reshape(shape))
            saturated = saturated | (acc < INT16[0]) | (acc > INT16[1])
            acc = np.clip(acc, *INT16)
        self.accumulators.setdefault(self.node, Accumulator(16)).record(saturated)
        return acc


Kernel = Callable[[Context, list, dict], list]


def padded_inputs(inputs: list, count: int) -> list:
    """The node's inputs with absent optional ones as None, `count` in all."""
    return [*inputs, *[None] * count][:count]


def minus(codes: np.ndarray, zero_point: np.ndarray | None, axis: int | None = None) -> np.ndarray:
    """Codes with their zero point removed, as int64 (per-axis zero points on `axis`)."""
    values = codes.astype(np.int64)
    if zero_point is None:
        return values
    zp = zero_point.astype(np.int64)
    if zp.ndim == 1 and zp.size > 1 and axis is not None:
        shape = [1] * values.ndim
        shape[axis] = zp.size
        zp = zp.reshape(shape)
    return values - zp


def out_dtype(zero_point: np.ndarray | None, fallback: np.dtype) -> np.dtype:
    return zero_point.dtype if zero_point is not None else fallback


def zp_or_zero(zero_point: np.ndarray | None, dtype: np.dtype) -> np.ndarray:
    return zero_point if zero_point is not None else np.zeros((), dtype)
