"""QLinearAdd and QLinearMul in one compiled pass (Numba) over codes as (R, S) spans: the
steps of `mlas.qlinear_add` and `mlas.qlinear_mul`, element by element, where b has a's shape
or one value per row. Apart from `compiled.py`'s convolutions: only `mlas.py` calls them.
"""

from __future__ import annotations

import numpy as np

from qdq.engine.jit import compile_kernel


def _add_spans(a, b, r_a, r_b, fixed, low, high, out):
    """`mlas.qlinear_add` on (R, S) codes, b (R, S) or one value per row (R, 1): the FMAs as
    float64 products of a code and a float32 ratio (exact) plus a float32, rounded once."""
    rows, size = a.shape
    per_row = b.shape[1] == 1
    for i in range(rows):
        for j in range(size):
            code = b[i, 0] if per_row else b[i, j]
            inner = np.float32(np.float64(code) * r_b + fixed)
            value = np.float32(np.float64(a[i, j]) * r_a + np.float64(inner))
            if -2147483648.0 < value < 2147483648.0:  # `mlas.convert_and_pack`
                out[i, j] = min(max(np.rint(value), low), high)
            else:
                out[i, j] = low


def _mul_spans(a, a_zp, b, b_zp, ratio, c_zp, low, high, out):
    """`mlas.qlinear_mul` on (R, S) codes, b (R, S) or one value per row (R, 1): float32
    `product * ratio + c_zp`, then `mlas.convert_and_pack` (beyond int32: the minimum)."""
    rows, size = a.shape
    per_row = b.shape[1] == 1
    for i in range(rows):
        for j in range(size):
            code = b[i, 0] if per_row else b[i, j]
            product = (np.int32(a[i, j]) - a_zp) * (np.int32(code) - b_zp)
            value = np.float32(product) * ratio + c_zp
            if -2147483648.0 < value < 2147483648.0:
                out[i, j] = min(max(np.rint(value), low), high)
            else:
                out[i, j] = low


add_spans = compile_kernel(_add_spans)
mul_spans = compile_kernel(_mul_spans)


def spans(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """a and b as (R, S) and (R, S) or (R, 1) when b equals a's shape or holds one value per
    leading index (b's trailing dims all 1, its leading dims a's); else None."""
    if a.shape == b.shape:
        return a.reshape(1, -1), b.reshape(1, -1)
    if b.ndim != a.ndim or a.ndim == 0:
        return None
    lead = b.ndim
    while lead and b.shape[lead - 1] == 1:
        lead -= 1
    if b.shape[:lead] != a.shape[:lead]:
        return None
    rows = int(np.prod(a.shape[:lead]))
    return a.reshape(rows, -1), b.reshape(rows, 1)
