"""Shared hypothesis settings and strategies."""

from __future__ import annotations

import os

import numpy as np
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

settings.register_profile(
    "ci", max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile("dev", max_examples=200, deadline=None)
settings.load_profile("ci" if os.environ.get("CI") else "dev")


def float_arrays(min_size: int = 1, max_size: int = 200, bound: float = 1e4) -> st.SearchStrategy:
    """1-D float32 arrays of finite values, as calibration batches."""
    element = st.floats(-bound, bound, allow_nan=False, allow_infinity=False, width=32)
    return st.lists(element, min_size=min_size, max_size=max_size).map(
        lambda v: np.asarray(v, dtype=np.float32)
    )
