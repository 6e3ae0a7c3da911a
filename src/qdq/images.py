"""Pictures as calibration samples: how a folder of image files becomes an input tensor
(decoded, resized, scaled, normalized, laid out), checked against the model's input."""

from __future__ import annotations

import math
import numbers
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from qdq.arrayfile import check_regular
from qdq.errors import DataError


class ImageInput(Protocol):
    """What a picture folder reads of a model input (`qdq.data.InputSpec`)."""

    shape: tuple[int | None, ...]
    dtype: np.dtype

    def describe(self) -> str: ...


IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
IMAGE_PIXEL_LIMIT = 50_000_000  # 150 MB as 8-bit RGB; a larger picture is no calibration image


@dataclass(frozen=True)
class ImageOptions:
    """How image files become an input tensor: resized to (height, width), scaled by
    `value_scale` (1/255 maps 8-bit pixels to [0, 1]), normalized by `mean` and `std` per channel,
    in RGB or BGR order, laid out NCHW or NHWC."""

    size: tuple[int, int] | None = None
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    value_scale: float = 1 / 255
    layout: str = "NCHW"
    channel_order: str = "RGB"

    def __post_init__(self) -> None:
        size = self.size
        pair = isinstance(size, tuple | list) and len(size) == 2
        if size is not None and not (pair and all(_whole(v) and v >= 1 for v in size)):
            raise DataError(f"`size` must be two sizes >= 1 (height, width), got {size!r:.60}")
        for flag, values in (("`mean`", self.mean), ("`std`", self.std)):
            listed = isinstance(values, tuple | list) and len(values) > 0
            if not listed or not all(_number(v) and math.isfinite(v) for v in values):
                raise DataError(f"{flag} must be a list of finite numbers, got {values!r:.60}")
        if 0 in self.std:
            raise DataError(f"`std` must be non-zero (it divides), got {list(self.std)}")
        scale = self.value_scale
        if not _number(scale) or not math.isfinite(scale) or scale == 0:
            raise DataError(f"`value_scale` must be finite and non-zero, got {self.value_scale}")
        reach = (255 * abs(scale) + max(map(abs, self.mean))) / min(map(abs, self.std))
        if reach > float(np.finfo(np.float32).max):
            raise DataError(
                f"`value_scale`, `mean` and `std` take pixels as far as {reach:.3g}, beyond "
                "float32's 3.4e38; give the model's own normalisation (e.g. std 58.4 or 0.229)"
            )
        if self.layout not in ("NCHW", "NHWC") or self.channel_order not in ("RGB", "BGR"):
            raise DataError(
                f"layout {self.layout!r} / channel order {self.channel_order!r}: "
                "choose NCHW or NHWC, and RGB or BGR"
            )


def _whole(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _number(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


class ImageFolder:
    """Pictures as samples: RGB, or grayscale for a one-channel input."""

    def __init__(self, files: list[Path], spec: ImageInput, options: ImageOptions) -> None:
        self.files, self.count, self.options = files, len(files), options
        self.spec = spec
        self.channels = _image_channels(spec, options)
        fixed = _fixed_size(spec, options.layout)
        if options.size is None and fixed is None:
            raise DataError(
                f"input {spec.describe()} has no fixed image size; give `size` (height, width)"
            )
        if options.size and fixed and tuple(options.size) != fixed:  # before any resizing
            raise DataError(
                f"`size` {tuple(options.size)} (height, width) differs from the input's fixed "
                f"{fixed} ({spec.describe()}); drop it or give {fixed[0]} {fixed[1]}"
            )
        self.size = options.size or fixed

    def read(self, picked: np.ndarray) -> np.ndarray:
        batch = np.stack([self._load(self.files[i]) for i in picked])
        if np.dtype(self.spec.dtype).kind not in "iu":
            return batch
        # an integer input (uint8 pixels, as many detectors take): whole values, as integers
        whole = np.rint(batch)
        if np.abs(batch - whole).max(initial=0.0) > 1e-3:
            raise DataError(
                f"input {self.spec.describe()} takes whole pixel values, and the pictures "
                "scaled and normalized are not whole; give `value_scale` 1 "
                "and no `mean` or `std` to feed the pixels as they are"
            )
        return whole.astype(np.int64)

    def describe(self) -> str:
        """What the pictures were made into: a wrong folder or option shows in the report."""
        o, (height, width) = self.options, self.size
        color = "grayscale" if self.channels == 1 else o.channel_order
        return (
            f"pictures read as {color} {height}x{width} (resized), pixels times "
            f"{o.value_scale:.6g}, less mean {list(o.mean)}, over std {list(o.std)}, {o.layout}"
        )

    def _load(self, path: Path) -> np.ndarray:
        o = self.options
        pixels = _decode(path, "L" if self.channels == 1 else "RGB", self.size)
        pixels = pixels.reshape(*self.size, self.channels) * np.float32(o.value_scale)
        if o.channel_order == "BGR":
            pixels = pixels[..., ::-1]
        pixels = (pixels - np.asarray(o.mean, np.float32)) / np.asarray(o.std, np.float32)
        return pixels.transpose(2, 0, 1) if o.layout == "NCHW" else pixels


def _decode(path: Path, mode: str, size: tuple[int, int]) -> np.ndarray:
    """The picture at `path` in `mode`, resized to (height, width); JPEGs are decoded at a
    reduced scale where that suffices, and pictures over IMAGE_PIXEL_LIMIT are refused."""
    from PIL import Image

    check_regular(path, "an image file")
    limit = f"qdq's limit of {IMAGE_PIXEL_LIMIT / 1e6:.0f} megapixels; downscale it first"
    try:
        with warnings.catch_warnings():  # PIL's (its own pixel limit, corrupt EXIF): not ours
            warnings.simplefilter("ignore")
            with Image.open(path) as image:
                width, height = image.size
                if width * height > IMAGE_PIXEL_LIMIT:
                    raise DataError(f"{path} is {width}x{height} pixels, over {limit}")
                if image.mode.startswith("I;16"):  # 0..65535: PIL's convert clamps at 255
                    return _sixteen_bit(image, mode, size)
                if image.mode in ("I", "F"):  # no scale they are on: convert clamps them too
                    raise DataError(
                        f"{path} holds {'32-bit integer' if image.mode == 'I' else 'float'} "
                        "pixels, on no scale qdq knows (it reads 8 and 16 bits); save the "
                        "samples as .npy arrays, scaled as the model expects"
                    )
                image.draft(mode, (size[1], size[0]))
                picture = image.convert(mode).resize((size[1], size[0]))
    except Image.DecompressionBombError:
        raise DataError(f"{path} is over {limit}") from None
    except (OSError, ValueError, SyntaxError, EOFError) as error:
        if isinstance(error, DataError):
            raise
        raise DataError(f"{path} is not a readable image ({error})") from None
    return np.asarray(picture, dtype=np.float32)


def _sixteen_bit(image: object, mode: str, size: tuple[int, int]) -> np.ndarray:
    """A 16-bit grayscale picture on the 8-bit scale (divided by 257: 65535 -> 255), resized,
    as the grayscale or RGB array `mode` asks for."""
    from PIL import Image

    levels = np.asarray(image, dtype=np.float32) / np.float32(257)
    resized = Image.fromarray(levels, mode="F").resize((size[1], size[0]))
    gray = np.asarray(resized, dtype=np.float32)
    return gray if mode == "L" else np.repeat(gray[..., None], 3, axis=2)


def _image_channels(spec: ImageInput, options: ImageOptions) -> int:
    """1 or 3 channels, from the input's shape (3 where that axis is free)."""
    if len(spec.shape) != 4:
        raise DataError(
            f"input {spec.describe()} is not an image batch (rank 4); "
            "give an .npz or .npy instead of a folder of images"
        )
    channels = spec.shape[1] if options.layout == "NCHW" else spec.shape[3]
    channels = 3 if channels is None else channels
    if channels not in (1, 3):
        raise DataError(
            f"input {spec.describe()} has {channels} channels in {options.layout}; images "
            "give 1 (grayscale) or 3 (RGB): check `layout`, or give .npy data"
        )
    for flag, values in (("`mean`", options.mean), ("`std`", options.std)):
        if len(values) not in (1, channels):
            raise DataError(
                f"{flag} has {len(values)} values for {channels} channels; "
                f"give 1 (for all channels) or {channels}"
            )
    return channels


def _fixed_size(spec: ImageInput, layout: str) -> tuple[int, int] | None:
    """The input's (height, width) where its shape fixes both, else None."""
    dims = spec.shape[2:4] if layout == "NCHW" else spec.shape[1:3]
    return None if len(spec.shape) != 4 or None in dims else (int(dims[0]), int(dims[1]))
