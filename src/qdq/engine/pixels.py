"""Channels-last memory behind (N, C, H, W) tensors, and how kernels get their result arrays.

The compiled convolutions write their codes as an (N, C, H, W) view of (N, H, W, C) memory:
the next convolution then reads a pixel's channels as one run and no layer transposes its
input. These helpers tell the layouts apart and convert views without copies.
"""

from __future__ import annotations

import numpy as np


def as_pixels(x: np.ndarray) -> np.ndarray:
    """x (N, C, H, W) viewed as (N, H, W, C), without a copy: contiguous when its memory is
    channels-last, as the compiled convolutions write their outputs."""
    return x.transpose(0, 2, 3, 1)


def from_pixels(pixels: np.ndarray) -> np.ndarray:
    """(N, H, W, C) memory viewed as the (N, C, H, W) tensor the graph holds."""
    return pixels.transpose(0, 3, 1, 2)


def channels_last(*tensors: np.ndarray) -> bool:
    """Whether the tensors are 4-D, of one shape, in channels-last memory that is not also
    contiguous as (N, C, H, W): elementwise kernels then run on their pixels (`as_pixels`),
    where flattening them copies nothing."""
    shape = tensors[0].shape
    return all(
        t.ndim == 4
        and t.shape == shape
        and as_pixels(t).flags.c_contiguous
        and not t.flags.c_contiguous
        for t in tensors
    )


def fresh(shape: tuple[int, ...], dtype: np.dtype, slot: str = "out") -> np.ndarray:
    """A new uninitialized array: how the kernels allocate unless the engine lends its own
    (`context.Context.empty`, called with the same arguments)."""
    return np.empty(shape, dtype)
