"""Files for bench/unseen.py's Magika: the first and last bytes of files of Python's own library
and of this environment's packages, as Magika's features.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np


@functools.cache
def _files_by_suffix() -> dict[str, list[Path]]:
    import sysconfig

    found: dict[str, list[Path]] = {}
    for root in sorted({sysconfig.get_paths()["stdlib"], sysconfig.get_paths()["purelib"]}):
        for path in sorted(Path(root).rglob("*")):
            if path.suffix and path.is_file() and not path.is_symlink():
                found.setdefault(path.suffix.lower(), []).append(path)
    return found


MAGIKA_BYTES = 1024  # Magika's standard_v3_3 reads this many bytes from each end of a file


def file_heads_tails(count: int, seed: int) -> np.ndarray:
    """`count` files of Python's own library and of this environment's packages (source, docs,
    data, images, archives, binaries), one extension drawn at random then one file of it, as
    Magika's features (count, 2048) int32: the first and last 1024 bytes of the file's first and
    last 4 KiB, whitespace stripped, padded with 256."""
    rng = np.random.default_rng(seed)
    by_suffix = _files_by_suffix()
    suffixes = sorted(s for s, paths in by_suffix.items() if len(paths) >= 3)
    out = np.full((count, 2 * MAGIKA_BYTES), 256, np.int32)
    for i in range(count):
        paths = by_suffix[suffixes[int(rng.integers(len(suffixes)))]]
        data = paths[int(rng.integers(len(paths)))].read_bytes()
        head = list(data[:4096].lstrip()[:MAGIKA_BYTES])
        tail = list(data[-4096:].rstrip()[-MAGIKA_BYTES:])
        out[i, : len(head)] = head
        out[i, 2 * MAGIKA_BYTES - len(tail) :] = tail
    return out
