"""Numba, the optional `fast` extra: whether it is installed, and how a kernel is compiled."""

from __future__ import annotations

try:
    from numba import njit
except ImportError:  # the NumPy path serves; `available()` says which
    njit = None


def available() -> bool:
    """Whether Numba is installed, so that `kernels="compiled"` can run."""
    return njit is not None


def compile_kernel(function):
    """`function` compiled (cached on disk, no GIL, IEEE arithmetic), or as it is without
    Numba."""
    if njit is None:
        return function
    return njit(cache=True, nogil=True, fastmath=False, error_model="numpy")(function)
