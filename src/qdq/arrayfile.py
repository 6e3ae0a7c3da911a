""".npy and .npz files read as untrusted input, one sample at a time.

Headers are parsed and checked (dtype, order, size against the bytes present, CRC) before any
sample is read; nothing is ever unpickled. Arrays stored uncompressed are memory-mapped; a
compressed .npz member is decompressed as a stream, so `--max-samples` bounds memory either way.

>>> import tempfile, numpy as np
>>> path = tempfile.mkdtemp() + "/x.npz"
>>> np.savez_compressed(path, x=np.arange(6.0).reshape(3, 2))
>>> open_npz(path)["x"].read(np.array([0, 2])).tolist()
[[0.0, 1.0], [4.0, 5.0]]
"""

from __future__ import annotations

import math
import os
import stat
import struct
import zipfile
import zlib
from pathlib import Path
from tokenize import TokenError
from typing import BinaryIO

import numpy as np
from numpy.lib import format as npy_format

from qdq.errors import DataError

NPY_MAGIC = b"\x93NUMPY"
ZIP_MAGIC = b"PK\x03\x04"
# A compressed member is streamed, which needs no memory, but each pass over the data inflates
# it again: past this size that costs more than re-saving it uncompressed.
COMPRESSED_LIMIT = 4 * 2**30
_LOCAL_HEADER = struct.Struct("<4s2B4HL2L2H")  # a zip member's local file header


def check_regular(path: Path, what: str) -> None:
    """Refuse a path that is missing or not a regular file (a FIFO would block, a device
    would stream forever)."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise DataError(f"{path} does not exist; give {what}") from None
    if not stat.S_ISREG(mode):
        raise DataError(f"{path} is not a regular file (a folder, FIFO or device); give {what}")


def _sniff(path: Path) -> bytes:
    """The first bytes of `path`, to tell an .npy from an .npz whatever its name says."""
    with open(path, "rb") as stream:
        return stream.read(len(NPY_MAGIC))


class Member:
    """One array of an .npz (or an .npy file): `count` samples on its leading axis."""

    def __init__(self, where: str, shape: tuple[int, ...], dtype: np.dtype) -> None:
        if not shape:
            raise DataError(f"{where} is a scalar; stack samples on the leading axis")
        self.where, self.shape, self.dtype, self.count = where, shape, dtype, shape[0]

    def checked(self, picked: object) -> np.ndarray:
        """`picked` as sample positions: whole numbers in [0, count). A compressed member read
        its header's bytes as data for -1, and sample 0 for 0.5."""
        positions = np.asarray(picked)
        if positions.size and positions.dtype.kind not in "iu":
            raise DataError(f"{self.where}: sample positions must be integers, got {positions}")
        positions = positions.astype(np.int64).reshape(-1)
        if positions.size and (positions.min() < 0 or positions.max() >= self.count):
            raise DataError(
                f"{self.where}: sample positions must lie in 0..{self.count - 1}, got "
                f"{positions.min()}..{positions.max()}"
            )
        return positions


class Mapped(Member):
    """An array stored uncompressed: memory-mapped, only the picked samples read."""

    def __init__(self, where: str, path: Path, offset: int, shape: tuple, dtype: np.dtype):
        super().__init__(where, shape, dtype)
        self.path, self.offset = path, offset

    def read(self, picked: np.ndarray) -> np.ndarray:
        picked = self.checked(picked)
        if math.prod(self.shape) == 0:
            return np.empty((len(picked), *self.shape[1:]), self.dtype)
        array = np.memmap(self.path, self.dtype, "r", offset=self.offset, shape=self.shape)
        return np.array(array[picked])


class Streamed(Member):
    """A compressed .npz member: inflated as a stream, sample by sample (forward reads are
    cheap; going back restarts the stream)."""

    def __init__(self, where: str, archive: zipfile.ZipFile, info: zipfile.ZipInfo, start: int,
                 shape: tuple, dtype: np.dtype):  # fmt: skip
        super().__init__(where, shape, dtype)
        self.archive, self.info, self.start = archive, info, start
        self.sample_bytes = math.prod(shape[1:]) * dtype.itemsize

    def read(self, picked: np.ndarray) -> np.ndarray:
        picked = self.checked(picked)
        if not len(picked):
            return np.empty((0, *self.shape[1:]), self.dtype)
        samples = []
        with self.archive.open(self.info) as stream:
            for i in np.sort(picked):
                stream.seek(self.start + int(i) * self.sample_bytes)
                samples.append(np.frombuffer(stream.read(self.sample_bytes), self.dtype))
        batch = np.stack(samples).reshape(len(picked), *self.shape[1:])
        return batch[np.argsort(np.argsort(picked))]  # back in the order asked for


def open_npy(path: str | os.PathLike[str]) -> Mapped:
    """An .npy file of samples, checked and memory-mapped."""
    path = Path(path)
    shape, dtype, start = _npy_header(path)
    return Mapped(str(path), path, start, shape, dtype)


def load_npy(path: str | os.PathLike[str]) -> np.ndarray:
    """An .npy file of any shape (one sample), checked, memory-mapped where it has data."""
    path = Path(path)
    shape, dtype, start = _npy_header(path)
    if math.prod(shape) == 0:
        return np.empty(shape, dtype)
    return np.memmap(path, dtype, "r", offset=start, shape=shape)


def npy_shape(path: str | os.PathLike[str]) -> tuple[int, ...]:
    """An .npy file's shape, from its checked header alone."""
    return _npy_header(Path(path))[0]


def _npy_header(path: Path) -> tuple[tuple[int, ...], np.dtype, int]:
    check_regular(path, "an .npy file")
    if _sniff(path).startswith(ZIP_MAGIC):
        raise DataError(f"{path} is an .npz archive named .npy; rename it to .npz")
    with open(path, "rb") as stream:
        shape, dtype, start = _header(stream, str(path))
    _check_size(str(path), shape, dtype, path.stat().st_size - start)
    return shape, dtype, start


def open_npz(path: str | os.PathLike[str]) -> dict[str, Mapped | Streamed]:
    """The arrays of an .npz by name, each checked (header, size, CRC) but not read."""
    path = Path(path)
    check_regular(path, "an .npz file")
    if _sniff(path) == NPY_MAGIC:
        raise DataError(f"{path} is an .npy file named .npz; rename it to .npy")
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, EOFError) as error:
        raise DataError(
            f"{path} is not a readable .npz ({error}); save it with numpy.savez"
        ) from None
    try:
        members = {
            info.filename[: -len(".npy")]: _member(path, archive, info)
            for info in archive.infolist()
            if info.filename.endswith(".npy")
        }
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, struct.error,
            NotImplementedError) as error:  # fmt: skip
        archive.close()
        raise DataError(
            f"{path} is not a readable .npz ({error}); save it with numpy.savez"
        ) from None
    except BaseException:
        archive.close()
        raise
    if not any(isinstance(m, Streamed) for m in members.values()):
        archive.close()
    return members


def read_arrays(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """Every array of an .npz (or the one of an .npy, named by the file's stem), whole."""
    path = Path(path)
    check_regular(path, "an .npz or .npy file")
    members = open_npz(path) if _sniff(path).startswith(ZIP_MAGIC) else {path.stem: open_npy(path)}
    return {name: m.read(np.arange(m.count)) for name, m in members.items()}


def _member(path: Path, archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> Mapped | Streamed:
    where = f"{path}: array {info.filename[:-4]!r}"
    if info.flag_bits & 0x1:
        raise DataError(f"{where} is encrypted; save it with numpy.savez")
    with archive.open(info) as stream:
        shape, dtype, start = _header(stream, where)
    _check_size(where, shape, dtype, info.file_size - start)
    if info.compress_type != zipfile.ZIP_STORED and info.file_size > COMPRESSED_LIMIT:
        raise DataError(
            f"{where} is compressed and inflates to {info.file_size / 2**30:.1f} GiB (over "
            f"{COMPRESSED_LIMIT / 2**30:.0f} GiB); save it with numpy.savez, not savez_compressed, "
            "so that it can be memory-mapped"
        )
    _verify_crc(archive, info)
    if info.compress_type == zipfile.ZIP_STORED:
        return Mapped(where, path, _data_offset(path, info) + start, shape, dtype)
    return Streamed(where, archive, info, start, shape, dtype)


def _header(stream: BinaryIO, where: str) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, dtype, offset of the data) from an .npy header, refusing what qdq cannot read."""
    try:
        version = npy_format.read_magic(stream)
        if version == (1, 0):
            shape, fortran, dtype = npy_format.read_array_header_1_0(stream)
        elif version == (2, 0):
            shape, fortran, dtype = npy_format.read_array_header_2_0(stream)
        else:
            raise ValueError(f"unsupported .npy version {version}")
    except (ValueError, EOFError, SyntaxError, TypeError, RecursionError, TokenError) as error:
        raise DataError(f"{where} is not a readable .npy array ({error})") from None
    if dtype.hasobject:
        raise DataError(
            f"{where} holds Python objects, which qdq never unpickles (a pickle can run code); "
            "save a numeric array"
        )
    if fortran and len(shape) > 1:
        raise DataError(f"{where} is in Fortran order; save numpy.ascontiguousarray(a)")
    return tuple(shape), dtype, stream.tell()


def _check_size(where: str, shape: tuple, dtype: np.dtype, present: int) -> None:
    claimed = math.prod(shape) * dtype.itemsize
    if claimed != present:
        raise DataError(
            f"{where}: its header claims shape {shape} of {dtype} ({claimed} bytes) but "
            f"{present} bytes follow; the file is truncated or corrupt, save it again"
        )


def _verify_crc(archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> None:
    """Read the member through once, in 1 MiB pieces: zipfile checks the CRC at its end."""
    with archive.open(info) as stream:
        while stream.read(2**20):
            pass


def _data_offset(path: Path, info: zipfile.ZipInfo) -> int:
    """Where a stored member's bytes start: after its local header, name and extra field."""
    with open(path, "rb") as stream:
        stream.seek(info.header_offset)
        fields = _LOCAL_HEADER.unpack(stream.read(_LOCAL_HEADER.size))
    name_length, extra_length = fields[-2], fields[-1]
    return info.header_offset + _LOCAL_HEADER.size + name_length + extra_length
