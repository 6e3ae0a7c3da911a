"""Calibration and evaluation data: .npz, .npy, a folder of .npy samples, or a folder of images.

Everything is checked against the model's inputs before any work, and samples are read lazily,
batch by batch, so a large set never sits in memory at once.
"""

from __future__ import annotations

import copy
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import onnx
from onnx import helper

from qdq.arrayfile import check_regular, load_npy, npy_shape, open_npy, open_npz
from qdq.errors import ArgumentError, DataError, ModelError
from qdq.images import IMAGE_SUFFIXES, ImageFolder, ImageOptions


@dataclass(frozen=True)
class InputSpec:
    """A model input: name, NumPy dtype, and shape with None for symbolic dimensions."""

    name: str
    dtype: np.dtype
    shape: tuple[int | None, ...]
    ranked: bool = True  # False: the model declares no shape at all, so any rank goes

    @property
    def batched(self) -> bool:
        """Whether samples stack on its leading axis; else (a scalar, a leading axis fixed at
        more than 1: a sample rate, Silero VAD's [2, batch, 128] state) each sample holds the
        whole tensor, and samples go one per call."""
        return not self.ranked or self.shape[:1] in ((None,), (1,))

    def describe(self) -> str:
        dims = ", ".join("?" if d is None else str(d) for d in self.shape)
        return f"{self.name!r} {self.dtype}[{dims if self.ranked else '...'}]"


def model_inputs(model: onnx.ModelProto) -> list[InputSpec]:
    """The inputs a caller must feed (graph inputs that are not initializers)."""
    constants = {t.name for t in model.graph.initializer}
    specs = []
    for value in model.graph.input:
        if value.name in constants:
            continue
        tensor = value.type.tensor_type
        if any(d.HasField("dim_value") and d.dim_value == 0 for d in tensor.shape.dim):
            raise ModelError(
                f"model input {value.name!r} declares an axis of size 0, so it can only take "
                "empty tensors (ONNX Runtime refuses any other); export it with a free axis"
            )
        # Paddle's exporter writes a free axis as -1: only a positive size is fixed.
        dims = tuple(d.dim_value if d.dim_value > 0 else None for d in tensor.shape.dim)
        ranked = tensor.HasField("shape")
        specs.append(InputSpec(value.name, _input_dtype(value), dims, ranked))
    return specs


def _input_dtype(value: onnx.ValueInfoProto) -> np.dtype:
    """The NumPy dtype of a tensor input; sequences, maps and strings are refused."""
    kind = value.type.WhichOneof("value")
    elem_type = value.type.tensor_type.elem_type
    dtype = None
    if kind == "tensor_type" and elem_type in helper.get_all_tensor_dtypes():
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(elem_type))
    if dtype is None or dtype.hasobject:
        what = onnx.TensorProto.DataType.Name(elem_type) if kind == "tensor_type" else kind
        raise ModelError(
            f"model input {value.name!r} is of type {what}; qdq feeds numeric tensors only. "
            "Export the model with tensor inputs"
        )
    return dtype


def check_feeds(feeds: dict[str, np.ndarray], specs: Sequence[InputSpec], source: str) -> None:
    """Refuse feeds as ONNX Runtime does: every input present, its exact dtype and rank, and
    each fixed dimension as declared."""
    if not isinstance(feeds, Mapping):
        raise ArgumentError(
            f"{source} must map each input's name to an array, got {type(feeds).__name__}; "
            f"e.g. {{{specs[0].name if specs else 'input'!r}: array}}"
        )
    missing = [s.name for s in specs if s.name not in feeds]
    if missing:
        raise DataError(
            f"{source} lacks inputs {missing}; the model expects "
            f"{[s.describe() for s in specs]}, one array each"
        )
    for spec in specs:
        array = np.asarray(feeds[spec.name])
        fits = not spec.ranked or (
            array.ndim == len(spec.shape)
            and all(d is None or d == n for d, n in zip(spec.shape, array.shape, strict=False))
        )
        if array.dtype != spec.dtype or not fits:
            raise DataError(
                f"{source}: input {spec.describe()} got {array.dtype}{list(array.shape)}; "
                f"give a {spec.dtype} array of that shape"
            )


class Samples:
    """Validated samples from `source` for `inputs`, served in batches of `batch_size`."""

    def __init__(
        self,
        source: str | Path,
        inputs: Sequence[InputSpec],
        max_samples: int | None = None,
        images: ImageOptions | None = None,
        seed: int | None = None,
    ) -> None:
        if not str(source):  # Path("") is the working folder: an unset $CALIB had read it
            raise DataError("the data path is empty; give an .npz, an .npy or a folder of them")
        self.source = Path(source)
        self.inputs = list(inputs)
        self.images = images or ImageOptions()
        if not self.inputs:
            raise DataError("the model has no inputs to feed: there is nothing to calibrate")
        if max_samples is not None and max_samples < 1:
            raise DataError(f"`max_samples` must be >= 1, got {max_samples}")
        if seed is not None and seed < 0:
            raise DataError(f"`seed` must be >= 0, got {seed}")
        self._unused: list[str] = []  # an .npz's arrays that no input takes
        self._skipped: list[str] = []  # a folder's files that are not its samples
        self._readers = self._open()
        counts = {name: reader.count for name, reader in self._readers.items()}
        if len(set(counts.values())) > 1:
            raise DataError(f"{self.source}: inputs hold different sample counts {counts}")
        total = next(iter(counts.values()))
        if total == 0:
            raise DataError(f"{self.source} holds no samples; calibration needs at least one")
        order = np.random.default_rng(seed).permutation(total) if seed is not None else None
        self.count = min(total, max_samples) if max_samples else total
        self.order = np.arange(self.count) if order is None else np.sort(order[: self.count])
        self.largest_batch = _largest_batch(self.inputs)
        self.ragged = any(getattr(reader, "ragged", False) for reader in self._readers.values())
        self._check_first_sample()

    def __getstate__(self) -> dict[str, object]:
        """Pickled without its open files: a worker process opens the source again."""
        return {key: value for key, value in self.__dict__.items() if key != "_readers"}

    def __setstate__(self, state: dict[str, object]) -> None:
        self.__dict__.update(state)
        self._readers = self._open()

    def read_notes(self, read_elsewhere: Collection[str] = ()) -> list[str]:
        """What the user may not expect of how the samples were read: how a folder of pictures
        became tensors (size, color, scaling), and an .npz's arrays that no input takes (a
        misspelt input name, labels) unless the caller reads them (`read_elsewhere`)."""
        readers = [r for r in self._readers.values() if isinstance(r, ImageFolder)]
        notes = [f"{self.source}: " + readers[0].describe()] if readers else []
        if not readers and self.images != ImageOptions():
            notes.append(
                f"{self.source} holds arrays, not pictures: the image options (size, mean, "
                "std, scale, layout, channel order) were not applied"
            )
        unused = [key for key in self._unused if key not in read_elsewhere]
        if unused:
            notes.append(f"{self.source}: arrays {unused} feed no model input; not read")
        notes += [f"{self.source}: {skipped}" for skipped in self._skipped]
        return notes

    def span(self, first: int, last: int) -> Samples:
        """Samples `first` up to `last` on their own (the same open files, nothing read)."""
        return self.subset(np.arange(first, min(last, self.count)))

    def subset(self, picked: np.ndarray) -> Samples:
        """The samples at positions `picked`, in that order, on their own (the same open
        files, nothing read)."""
        part = copy.copy(self)
        part.order = self.order[np.asarray(picked, np.int64)]
        part.count = len(part.order)
        return part

    def batches(
        self, batch_size: int, first: int = 0, last: int | None = None
    ) -> Iterator[dict[str, np.ndarray]]:
        """Feeds of up to `batch_size` samples (one where the model's batch axis is fixed at 1,
        an input is not batched on its leading axis, or the samples differ in shape) from
        sample `first` up to `last`, in order, each checked for NaN and Inf."""
        if batch_size < 1:
            raise DataError(f"batch size must be >= 1, got {batch_size}")
        batch_size = min(batch_size, 1 if self.ragged else self.largest_batch or batch_size)
        end = self.count if last is None else min(last, self.count)
        for start in range(first, end, batch_size):
            picked = self.order[start : min(start + batch_size, end)]
            feed = {name: r.read(picked) for name, r in self._readers.items()}
            for spec in self.inputs:
                feed[spec.name] = _checked(feed[spec.name], spec, self.source, picked)
                if not spec.batched:  # its one sample's whole tensor (a 0-d array for a scalar)
                    feed[spec.name] = feed[spec.name].reshape(feed[spec.name].shape[1:])
            yield feed

    def held_in(self, feed: dict[str, np.ndarray]) -> int:
        """How many samples a feed of `batches` holds: one where they go one per call, else
        the leading axis of its inputs (then each input is batched on it)."""
        if self.ragged or self.largest_batch == 1:
            return 1
        return len(feed[self.inputs[0].name])

    def sequence(self, limit: int, max_bytes: int) -> tuple[dict[str, np.ndarray], int]:
        """The first `limit` samples as one feed, joined on the inputs whose leading axis is
        free, and how many samples it holds, where another input fixes the batch at 1: that
        free axis is then a sequence the model takes whole in one call (Silero VAD's frames,
        beside one LSTM state), not a batch, and its inputs of fixed size take the first
        sample's. No more samples than fit in `max_bytes` (a run of large samples is more
        likely a batch, and costs memory); elsewhere the first sample alone."""
        first = next(self.batches(1))
        free = [s.name for s in self.inputs if s.shape[:1] == (None,)]  # unranked: not joined
        limit = min(limit, max_bytes // max(1, sum(first[name].nbytes for name in free)))
        whole = any(not spec.batched for spec in self.inputs)  # a batch axis inside: not joined
        if (
            whole
            or self.ragged
            or self.largest_batch != 1
            or not free
            or min(limit, self.count) < 2
        ):
            return first, 1
        steps = list(self.batches(1, last=limit))
        joined = {name: np.concatenate([step[name] for step in steps]) for name in free}
        return first | joined, len(steps)

    def _open(self) -> dict[str, _Reader]:
        if not self.source.exists():
            raise DataError(f"{self.source} does not exist; give an .npz, .npy or a folder")
        if self.source.is_dir():
            every = sorted(p for p in self.source.iterdir() if p.is_file())
            files = [p for p in every if not p.name.startswith(".")]  # macOS's ._x.png, stale
            if len(files) < len(every):
                hidden = len(every) - len(files)
                self._skipped.append(f"{hidden} hidden files (names starting '.'); not read")
            arrays = [p for p in files if p.suffix.lower() == ".npy"]
            pictures = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
            if arrays:
                spec = self._only_input()
                if pictures:  # the arrays are the samples; said, as an .npz's unused arrays are
                    self._skipped.append(
                        f"{len(pictures)} pictures beside its .npy files; not read"
                    )
                return {spec.name: _NpyFolder(arrays, len(spec.shape))}
            if pictures:
                spec = self._only_input()
                return {spec.name: ImageFolder(pictures, spec, self.images)}
            folders = any(p.is_dir() for p in self.source.iterdir())
            raise DataError(
                f"{self.source} holds no .npy or image files"
                + (
                    "; its subfolders are not read: give one of them, or move the files up"
                    if folders
                    else ""
                )
            )
        suffix = self.source.suffix.lower()  # X.NPZ as x.npz, as pictures' suffixes are
        if suffix not in (".npz", ".npy"):
            raise DataError(f"{self.source}: expected an .npz, .npy or a folder of .npy or images")
        check_regular(self.source, "an .npz, .npy or a folder")
        if suffix == ".npy":
            return {self._only_input().name: open_npy(self.source)}
        return self._open_npz()

    def _open_npz(self) -> dict[str, _Reader]:
        archive = open_npz(self.source)
        keys = list(archive)
        if len(self.inputs) == 1 and len(keys) == 1:
            return {self.inputs[0].name: archive[keys[0]]}
        expected = [s.name for s in self.inputs]
        missing = [name for name in expected if name not in keys]
        if missing:
            raise DataError(
                f"{self.source} has arrays {keys} but the model's inputs are {expected}; "
                f"add {missing} (one array per input, samples on the leading axis)"
            )
        self._unused = [key for key in keys if key not in expected]
        return {name: archive[name] for name in expected}

    def _only_input(self) -> InputSpec:
        if len(self.inputs) != 1:
            names = [s.name for s in self.inputs]
            raise DataError(
                f"{self.source}: this form of data feeds one input, but the model has {names}; "
                "use an .npz with one array per input"
            )
        return self.inputs[0]

    def _check_first_sample(self) -> None:
        for spec in self.inputs:
            reader = self._readers[spec.name]
            _checked(reader.read(self.order[:1]), spec, self.source, self.order[:1])


def _largest_batch(inputs: Sequence[InputSpec]) -> int | None:
    """1 where an input's leading (batch) axis is fixed at 1, as exporters often leave it, or
    an input is not batched on its leading axis (`InputSpec.batched`); None where every
    leading axis is free."""
    return 1 if any(not s.batched or s.shape[:1] == (1,) for s in inputs) else None


def _checked(batch: np.ndarray, spec: InputSpec, source: Path, picked: np.ndarray) -> np.ndarray:
    """`batch` (the samples at positions `picked` of the data) in the input's dtype, after
    shape, dtype, range and finiteness checks."""
    want = spec.shape[1:] if spec.batched else spec.shape  # a batch of 1 whole tensor
    got = batch.shape[1:]
    if spec.ranked and (
        len(got) != len(want)
        or any(w is not None and w != g for w, g in zip(want, got, strict=True))
    ):
        raise DataError(
            f"{source}: input {spec.describe()} needs samples of shape "
            f"({', '.join('?' if d is None else str(d) for d in want)}), got {got}"
            + (
                " (samples are stacked on the leading axis in place of the batch axis)"
                if spec.batched
                else " (each sample holds the whole tensor, samples stacked on a new leading axis)"
            )
        )
    where = f"{source}: input {spec.name!r}"
    if batch.dtype.kind == "f" and not np.isfinite(batch).all():
        raise DataError(
            f"{where}, sample {_first_bad(batch, picked)} (from 0) holds NaN or Inf values; "
            "fix or drop those samples"
        )
    if batch.dtype != spec.dtype:
        same_kind = batch.dtype.kind == spec.dtype.kind or (
            batch.dtype.kind in "iu" and spec.dtype.kind in "iu"
        )
        if not same_kind:
            raise DataError(
                f"{where} expects {spec.dtype}, got {batch.dtype}; "
                f"convert the data (e.g. .astype('{spec.dtype}'))"
            )
        if spec.dtype.kind in "iu" and batch.size:
            info = np.iinfo(spec.dtype)
            outside = (batch < info.min) | (batch > info.max)
            if outside.any():
                raise DataError(
                    f"{where} is {spec.dtype}, and sample {_first_bad(~outside, picked)} holds "
                    f"values outside its range [{info.min}, {info.max}]; fix those samples"
                )
        with np.errstate(over="ignore", invalid="ignore"):  # what overflows is refused below
            batch = batch.astype(spec.dtype)
        if batch.dtype.kind == "f" and not np.isfinite(batch).all():
            raise DataError(
                f"{where} is {spec.dtype}, and sample {_first_bad(batch, picked)} holds values "
                f"beyond its range (up to {np.finfo(spec.dtype).max:.3g}); scale the data"
            )
    return np.ascontiguousarray(batch)


def _first_bad(batch: np.ndarray, picked: np.ndarray) -> int:
    """The data's position of the first sample in `batch` with a non-finite (or False)
    value: a batch is read in the data's order, or shuffled under a seed."""
    good = np.isfinite(batch) if batch.dtype.kind == "f" else batch
    rows = good.reshape(len(batch), -1).all(axis=1) if batch.ndim else np.array([good.all()])
    row = int(np.argmin(rows))
    return int(picked[row]) if len(picked) == len(batch) else int(picked[0])


class _Reader(Protocol):
    count: int

    def read(self, picked: np.ndarray) -> np.ndarray: ...


class _NpyFolder:
    """One sample per file, with or without a leading batch axis of 1 (told apart by rank);
    `ragged` where the files' samples differ in shape (clips or pictures of several sizes for
    a model with free axes), which are then read one at a time."""

    def __init__(self, files: list[Path], rank: int) -> None:
        self.files, self.count, self.rank = files, len(files), rank
        shapes = {self._unbatched(npy_shape(path)) for path in files}
        self.ragged = len(shapes) > 1

    def _unbatched(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        return shape[1:] if len(shape) == self.rank and shape[:1] == (1,) else shape

    def read(self, picked: np.ndarray) -> np.ndarray:
        samples = []
        for path in (self.files[i] for i in picked):
            sample = load_npy(path)
            samples.append(sample.reshape(self._unbatched(sample.shape)))
        shapes = {s.shape for s in samples}
        if len(shapes) > 1:
            raise DataError(f"samples in {self.files[0].parent} have different shapes {shapes}")
        return np.stack(samples)
