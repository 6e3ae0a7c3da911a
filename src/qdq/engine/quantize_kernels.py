"""QuantizeLinear, DequantizeLinear and DynamicQuantizeLinear as kernels: `quantize_ops`'
definitions, or `elementwise`'s compiled pass where it applies. Apart from `quantize_ops` so
that the ONNX definitions stay a plain NumPy reference.
"""

from __future__ import annotations

import qdq.engine.elementwise as elementwise
from qdq.engine.context import Context, padded_inputs
from qdq.engine.quantize_ops import dequantize_linear, dynamic_quantize_linear, quantize_linear


def _one_pass(ctx: Context, attrs: dict) -> bool:
    """Whether a QuantizeLinear/DequantizeLinear may take `elementwise`'s compiled pass: the
    compiled kernels, no blocks and no output type of its own (the pass checks the rest)."""
    return ctx.compiled and not attrs.get("block_size", 0) and not attrs.get("output_dtype", 0)


def quantize_linear_kernel(ctx: Context, inputs: list, attrs: dict) -> list:
    x, scale, zero_point = padded_inputs(inputs, 3)
    if (
        _one_pass(ctx, attrs)
        and (codes := elementwise.quantize(x, scale, zero_point, ctx.empty)) is not None
    ):
        return [codes]
    keys = ("axis", "block_size", "saturate", "output_dtype")
    return [quantize_linear(x, scale, zero_point, **{k: attrs[k] for k in keys if k in attrs})]


def dequantize_linear_kernel(ctx: Context, inputs: list, attrs: dict) -> list:
    x, scale, zero_point = padded_inputs(inputs, 3)
    if (
        _one_pass(ctx, attrs)
        and (real := elementwise.dequantize(x, scale, zero_point, ctx.empty)) is not None
    ):
        return [real]
    keys = ("axis", "block_size", "output_dtype")
    return [dequantize_linear(x, scale, zero_point, **{k: attrs[k] for k in keys if k in attrs})]


def dynamic_quantize_linear_kernel(ctx: Context, inputs: list, attrs: dict) -> list:
    return list(dynamic_quantize_linear(inputs[0]))
