"""Outputs judged as the tasks they serve: each output split into the quantities it joins, and
each part measured by what matters for it.

A YOLO-style head concatenates box coordinates in pixels and class scores in [0, 1] on one axis
(NudeNet's YOLOv8n: (1, 4 + 18, 2100)). Its SQNR as one tensor is the boxes' (pixels dwarf
scores), while the scores decide the detections. So every automatic choice scores the worst part
(`qdq.plan.part_stats.worst_sqnr`), and the reports show each part.

The rule that finds parts (`find_parts`), on the FP32 outputs of a few calibration samples:
along each non-batch axis of 2..MAX_CHANNELS channels, in order, each channel is a score channel
when all its values lie in [0, 1] and a value channel otherwise; the axis splits when its
channels form 2..MAX_RUNS contiguous runs and some value run reaches at least GAP in magnitude
(so 0.4-wide box offsets next to sigmoid scores do not split: nothing is certain there; pixels
next to scores are, and then a third run splits too, however small: a YOLOv8-seg head's mask
coefficients, up to 4.8-6.7 in magnitude, beside its boxes and score). The first axis that
splits wins; an output that splits nowhere is one part. Parts may also be declared
(`parse_parts`, `--output-parts NAME:AXIS:0-4,4-22`): their kinds come from the same statistics.
A head split into 4 value channels that reach GAP (boxes in pixels, not a face detector's box
deltas beside its landmarks) then score channels (then, in a segmenter's, mask coefficients) is
a detection head: its score part is also judged by detection F1 (`qdq.plan.detections`).

A dense head (CenterNet, CenterFace, StarDist) writes a score map and, on the same grid, maps
of values (offsets, sizes, landmarks, distances) that only mean something where the score map
fires: elsewhere the FP32 model writes noise that no int8 model reproduces (CenterFace's offset
map keeps 5 dB over the whole image and 19 dB at its faces). Such a value map is judged only
where FP32's score map passes CONFIDENCE (`Gate`, `find_gates`).
"""

from __future__ import annotations

import enum
import itertools
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np

from qdq.errors import DataError
from qdq.plan.detections import CONFIDENCE

MAX_CHANNELS = 1024  # a longer axis holds positions (anchors, pixels), not quantities
MAX_RUNS = 3  # [boxes | scores], [boxes | objectness | classes]; more runs: no clear layout
GAP = 8.0  # a value run must reach 8x a score's largest possible value (1) to count as apart
MIN_ROWS = 8  # samples before a layout is read from the data: one sample's logits can look split
TOP_K = 5
_SPEC = re.compile(r"^(?P<name>.+):(?P<axis>\d+):(?P<spans>\d+-\d+(,\d+-\d+)*)$")


class Kind(enum.StrEnum):
    """What a part holds: unbounded values, scores in [0, 1], or a detection head's boxes."""

    VALUES = "values"
    SCORES = "scores"
    BOXES = "boxes"


@dataclass(frozen=True)
class Gate:
    """A score map `output` whose channels lie along `axis`: the part it gates is judged only
    at positions where FP32's score in some channel passes CONFIDENCE."""

    output: str
    axis: int

    def mask(self, outputs: Mapping[str, np.ndarray]) -> np.ndarray:
        """Where the gated output counts, in a batch of FP32's outputs by name (the gated
        output's channel axis kept as 1, to broadcast)."""
        return (np.asarray(outputs[self.output]) > CONFIDENCE).any(axis=self.axis, keepdims=True)


@dataclass(frozen=True)
class Part:
    """Channels `start:stop` of `output` along `axis` (None: the whole output).

    >>> Part("y", 1, 4, 22, Kind.SCORES).label
    'y[:, 4:22]'
    """

    output: str
    axis: int | None = None
    start: int = 0
    stop: int = 0
    kind: Kind = Kind.VALUES
    gate: Gate | None = None

    @property
    def label(self) -> str:
        if self.gate is not None:
            return f"{self.output} where {self.gate.output} > {CONFIDENCE}"
        if self.axis is None:
            return self.output
        return f"{self.output}[{':, ' * self.axis}{self.start}:{self.stop}]"

    def take(self, output: np.ndarray) -> np.ndarray:
        """This part's values in a batch of the whole output."""
        if self.axis is None:
            return output
        return np.take(output, np.arange(self.start, self.stop), axis=self.axis)

    def pair(
        self, reference: np.ndarray, approximation: np.ndarray, outputs: Mapping[str, np.ndarray]
    ) -> tuple[np.ndarray, np.ndarray]:
        """This part of a batch of FP32's output and of its approximation, zero where a gate
        does not let it count (`outputs`: FP32's outputs of the batch by name)."""
        want, got = self.take(reference), self.take(approximation)
        if self.gate is None:
            return want, got
        mask = self.gate.mask(outputs)
        return np.where(mask, want, 0), np.where(mask, got, 0)


def parse_parts(spec: str) -> tuple[str, int, list[tuple[int, int]]]:
    """`NAME:AXIS:START-STOP,...` as (output name, axis, spans), checked.

    >>> parse_parts("output0:1:0-4,4-22")
    ('output0', 1, [(0, 4), (4, 22)])
    """
    match = _SPEC.match(spec)
    if match is None:
        raise DataError(
            f"`output_parts` {spec!r} is not NAME:AXIS:START-STOP,...; e.g. output0:1:0-4,4-22"
        )
    spans = [tuple(int(n) for n in s.split("-")) for s in match["spans"].split(",")]
    if int(match["axis"]) < 1 or any(a >= b for a, b in spans):
        raise DataError(
            f"`output_parts` {spec!r}: the axis must be >= 1 (0 is the batch) and each span "
            "START-STOP must have START < STOP"
        )
    ordered = sorted(spans)
    if any(b > c for (_, b), (c, _) in itertools.pairwise(ordered)):
        raise DataError(
            f"`output_parts` {spec!r}: the spans overlap; each channel belongs to one part"
        )
    return match["name"], int(match["axis"]), [(a, b) for a, b in spans]


def find_parts(
    name: str, batches: Sequence[np.ndarray], declared: Iterable[str] = ()
) -> list[Part]:
    """The parts of output `name` from its FP32 values in `batches` (the module's rule), or
    from a declared spec naming it. Batches without a value (a detector's (1, 0, 6) where it
    found nothing) tell nothing of the parts and are passed over."""
    first = batches[0]
    for spec in declared:
        output, axis, spans = parse_parts(spec)
        if output != name:
            continue
        if axis >= first.ndim or max(b for _, b in spans) > first.shape[axis]:
            raise DataError(
                f"`output_parts` {spec!r} does not fit output {name!r} of shape "
                f"{list(first.shape)}; give an axis and spans inside it"
            )
        if any(b.ndim != first.ndim or b.shape[axis] != first.shape[axis] for b in batches):
            raise DataError(
                f"`output_parts` {spec!r}: axis {axis} of output {name!r} changes size from "
                f"sample to sample ({first.shape[axis]}, then others); name an axis of fixed size"
            )
        valued = [b for b in batches if b.size]
        if not valued:  # nothing seen: values, untyped
            return [Part(name, axis, a, b, Kind.VALUES) for a, b in sorted(spans)]
        unit = _unit_channels(valued, axis)
        parts = [Part(name, axis, a, b, _kind(unit[a:b])) for a, b in sorted(spans)]
        return _typed(parts, valued)
    batches = [b for b in batches if b.size]
    if not batches:
        return [Part(name)]
    first = batches[0]
    if first.dtype.kind != "f" or first.ndim < 2:
        return [Part(name)]
    if sum(len(b) for b in batches) < MIN_ROWS:
        return [Part(name)]
    # quantities lie along the first non-batch axis or the last, never along image rows, nor
    # along an axis whose size varies between samples (a clip's time steps)
    for axis in dict.fromkeys((1, first.ndim - 1)):
        fixed = all(b.ndim == first.ndim and b.shape[axis] == first.shape[axis] for b in batches)
        if fixed and 2 <= first.shape[axis] <= MAX_CHANNELS:
            parts = _split(name, batches, axis)
            if parts:
                return _typed(parts, batches)
    return [Part(name)]


def _unit_channels(batches: Sequence[np.ndarray], axis: int) -> np.ndarray:
    """Per channel along `axis`: whether every value lies in [0, 1]."""
    lo = np.min([np.moveaxis(b, axis, 0).reshape(b.shape[axis], -1).min(1) for b in batches], 0)
    hi = np.max([np.moveaxis(b, axis, 0).reshape(b.shape[axis], -1).max(1) for b in batches], 0)
    return (lo >= 0) & (hi <= 1)


def _magnitude(batches: Sequence[np.ndarray], axis: int, start: int, stop: int) -> float:
    return max(float(np.abs(np.take(b, np.arange(start, stop), axis=axis)).max()) for b in batches)


def _kind(unit: np.ndarray) -> Kind:
    return Kind.SCORES if unit.all() else Kind.VALUES


def _split(name: str, batches: Sequence[np.ndarray], axis: int) -> list[Part]:
    """The runs of score and value channels along `axis`, if they make a clear layout."""
    unit = _unit_channels(batches, axis)
    edges = [0, *(np.flatnonzero(unit[1:] != unit[:-1]) + 1).tolist(), len(unit)]
    runs = list(itertools.pairwise(edges))
    if not 2 <= len(runs) <= MAX_RUNS:
        return []
    values = [(a, b) for a, b in runs if not unit[a]]
    if not any(_magnitude(batches, axis, a, b) >= GAP for a, b in values):  # NaN: not apart
        return []
    return [Part(name, axis, a, b, _kind(unit[a:b])) for a, b in runs]


def _typed(parts: list[Part], batches: Sequence[np.ndarray]) -> list[Part]:
    """A detection head ((batch, 4 value channels then scores[ then values][, positions]), the
    four reaching GAP: pixels, not a face detector's 0.4-wide box deltas beside its landmarks in
    pixels) gets its first part typed as boxes."""
    first = parts[0]
    head = batches[0].ndim in (2, 3) and len(parts) >= 2 and first.stop - first.start == 4
    head = head and _magnitude(batches, first.axis, first.start, first.stop) >= GAP
    if head and first.kind is Kind.VALUES and parts[1].kind is Kind.SCORES:
        return [replace(parts[0], kind=Kind.BOXES), *parts[1:]]
    return parts


def is_detection(parts: Sequence[Part]) -> bool:
    return len(parts) >= 2 and parts[0].kind is Kind.BOXES


def check_declared(declared: Iterable[str], names: Sequence[str]) -> None:
    """Each declared spec parses and names one of the model's float outputs `names`, once."""
    seen: dict[str, str] = {}
    for spec in declared:
        output = parse_parts(spec)[0]
        if output not in names:
            raise DataError(
                f"`output_parts` {spec!r} names no float output of the model; its float "
                f"outputs are {', '.join(names) or 'none'}"
            )
        if output in seen:  # only the first was read
            raise DataError(
                f"`output_parts` {seen[output]!r} and {spec!r} both split {output!r}; give one "
                "spec per output, its spans joined by commas"
            )
        seen[output] = spec


def output_parts(
    names: Sequence[str], reference: Sequence[Sequence[np.ndarray]], declared: Iterable[str] = ()
) -> dict[str, list[Part]]:
    """Each output's parts, from FP32's outputs on a few feeds (`reference`: per feed, the
    outputs in `names`' order) and the declared specs, which must name outputs."""
    declared = list(declared)
    check_declared(declared, names)
    found = {
        name: find_parts(name, [outputs[i] for outputs in reference], declared)
        for i, name in enumerate(names)
    }
    for name, gate in find_gates(names, reference).items():
        if found[name] == [Part(name)]:
            found[name] = [Part(name, gate=gate)]
    return found


def find_gates(names: Sequence[str], reference: Sequence[Sequence[np.ndarray]]) -> dict[str, Gate]:
    """The value maps of a dense head and the score map gating each: an output of at least 3
    dimensions with some value outside [0, 1] is gated by the first other output of its shape
    but for another channel count along axis 1 or the last (an equal count tells no axis), whose
    values all lie in [0, 1] and pass CONFIDENCE somewhere in `reference` (per feed, the
    outputs in `names`' order), on at least MIN_ROWS samples."""
    if not names or sum(len(np.atleast_1d(outputs[0])) for outputs in reference) < MIN_ROWS:
        return {}
    batches = {name: [np.asarray(o[i]) for o in reference] for i, name in enumerate(names)}
    unit = {
        name: b[0].dtype.kind == "f" and all(((x >= 0) & (x <= 1)).all() for x in b)
        for name, b in batches.items()
    }
    firing = {name: any((x > CONFIDENCE).any() for x in b) for name, b in batches.items()}
    gates = {}
    for name, values in batches.items():
        shape = values[0].shape
        if len(shape) < 3 or values[0].dtype.kind != "f" or unit[name]:
            continue
        for other, scores in batches.items():
            if other == name or not (unit[other] and firing[other]):
                continue
            axis = _channel_axis(shape, scores[0].shape)
            if axis is not None:
                gates[name] = Gate(other, axis)
                break
    return gates


def _channel_axis(values: tuple[int, ...], scores: tuple[int, ...]) -> int | None:
    """The axis (1 or the last) along which two shapes differ, if it is the only one."""
    if len(values) != len(scores):
        return None
    differ = [a for a, (v, s) in enumerate(zip(values, scores, strict=True)) if v != s]
    if len(differ) == 1 and differ[0] in (1, len(values) - 1):
        return differ[0]
    return None
