"""A convolution's geometry as ONNX's Conv and pooling attributes define it, for 2-D inputs."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ConvGeometry:
    """Convolution attributes, resolved for a 2-D input (N, C, H, W)."""

    kernel: tuple[int, int]
    strides: tuple[int, int]
    dilations: tuple[int, int]
    pads: tuple[int, int, int, int]  # top, left, bottom, right
    group: int

    @classmethod
    def from_attributes(cls, attrs: dict, x_shape: tuple[int, ...], w_shape: tuple[int, ...]):
        kernel = tuple(attrs.get("kernel_shape", w_shape[2:]))
        strides = tuple(attrs.get("strides", (1, 1)))
        dilations = tuple(attrs.get("dilations", (1, 1)))
        pads = tuple(attrs.get("pads", (0, 0, 0, 0)))
        auto_pad = attrs.get("auto_pad", b"NOTSET")
        auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
        if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
            pads = _same_pads(x_shape[2:], kernel, strides, dilations, auto_pad == "SAME_UPPER")
        elif auto_pad == "VALID":
            pads = (0, 0, 0, 0)
        return cls(
            kernel,
            strides,
            dilations,
            (pads[0], pads[1], pads[2], pads[3]),
            int(attrs.get("group", 1)),
        )

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """The output's rows and columns for an input of `height` x `width`."""
        top, left, bottom, right = self.pads
        (kh, kw), (dh, dw), (sh, sw) = self.kernel, self.dilations, self.strides
        return (
            (height + top + bottom - (kh - 1) * dh - 1) // sh + 1,
            (width + left + right - (kw - 1) * dw - 1) // sw + 1,
        )


def _same_pads(size, kernel, strides, dilations, upper: bool) -> tuple[int, int, int, int]:
    begins, ends = [], []
    for n, k, s, d in zip(size, kernel, strides, dilations, strict=True):
        out = -(-n // s)
        total = max(0, (out - 1) * s + (k - 1) * d + 1 - n)
        small, large = total // 2, total - total // 2
        begins.append(small if upper else large)
        ends.append(large if upper else small)
    return begins[0], begins[1], ends[0], ends[1]
