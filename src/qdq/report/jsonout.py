"""JSON that every parser reads: RFC 8259 has no Infinity or NaN, which Python's json writes
(an exact output's SQNR is infinite). They become null; numpy numbers become plain ones."""

from __future__ import annotations

import json
import math

import numpy as np


def strict_json(value: object) -> str:
    """`value` as indented JSON, non-finite numbers as null.

    >>> strict_json({"sqnr_db": float("inf"), "n": np.int64(3)}).split()
    ['{', '"sqnr_db":', 'null,', '"n":', '3', '}']
    """
    return json.dumps(_plain(value), indent=2, allow_nan=False)


def _plain(value: object) -> object:
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple | np.ndarray):
        return [_plain(item) for item in value]
    if isinstance(value, float | np.floating):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer | np.bool_):
        return value.item()
    return value
