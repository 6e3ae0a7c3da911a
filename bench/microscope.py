"""Microscope tiles for bench/unseen.py's nucleus segmenter: the phase-gradient-contrast image
napari-czann-segment ships, read from its .czi file with no CZI library, cut into tiles.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np


def czi_plane(path: Path) -> np.ndarray:
    """The first image of a Zeiss .czi file whose sub-block is stored uncompressed, read from
    the ZISRAW segments (header, directory entry, metadata, then the pixels) with no CZI
    library; napari-czann-segment ships PGC_20X.czi, a 16-bit phase-gradient-contrast field."""
    import struct

    data = path.read_bytes()
    at = 0
    while data[at : at + 16].rstrip(b"\0") != b"ZISRAWSUBBLOCK":
        at += 32 + struct.unpack_from("<q", data, at + 16)[0]  # id, allocated size, used size
    block = at + 32
    metadata, _, size = struct.unpack_from("<iiq", data, block)
    pixel_type, _, _, compression = struct.unpack_from("<iqii", data, block + 18)
    if (pixel_type, compression) != (1, 0):
        raise ValueError(f"{path}: only uncompressed Gray16 is read here")
    dims = {}
    for k in range(struct.unpack_from("<i", data, block + 44)[0]):
        entry = block + 48 + 20 * k
        dims[data[entry : entry + 4].rstrip(b"\0").decode()] = struct.unpack_from(
            "<i", data, entry + 8
        )[0]
    start = block + max(256, 48 + 20 * len(dims)) + metadata
    return np.frombuffer(data, "<u2", size // 2, start).reshape(dims["Y"], dims["X"])


def pgc_tiles(count: int, size: int, seed: int, right: bool) -> np.ndarray:
    """`count` tiles (count, size, size) in [0, 1] (16-bit scaled, as the czann model wants) of
    the phase-gradient-contrast image napari-czann-segment ships, turned by 0-3 quarter turns
    and mirrored at random: from its left half, or its `right` half (disjoint from the left)."""
    spec = importlib.util.find_spec("napari_czann_segment")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("napari-czann-segment is not installed: pip install -e '.[unseen]'")
    folder = Path(next(iter(spec.submodule_search_locations))) / "_data"
    image = czi_plane(folder / "PGC_20X.czi").astype(np.float32) / 65535
    half = image.shape[1] // 2
    image = image[:, half:] if right else image[:, :half]
    rng = np.random.default_rng(seed)
    out = np.zeros((count, size, size), np.float32)
    for i in range(count):
        top = int(rng.integers(0, image.shape[0] - size + 1))
        left = int(rng.integers(0, image.shape[1] - size + 1))
        tile = np.rot90(image[top : top + size, left : left + size], int(rng.integers(4)))
        out[i] = tile[:, ::-1] if rng.integers(2) else tile
    return out
