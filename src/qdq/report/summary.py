"""What `qdq quantize` reports: per node decisions, size, time, and per output part (a
detector's boxes and scores apart, `qdq.plan.parts`) its SQNR and task scores."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from qdq.config import Prefer
from qdq.plan.build import Candidate
from qdq.plan.decisions import Decision
from qdq.plan.frontier import ENOUGH_DB, latency_tie, pick
from qdq.plan.part_stats import PartStats
from qdq.plan.readings import Readings

CHECK_SAMPLES = 16  # calibration samples on which the report measures the output SQNR
LOW_SQNR = 10.0  # dB: below this the report warns (the noise is a third of the signal or more)
TASK_SCORES = {"top1_agreement": "top-1", "top5_agreement": "top-5", "detection_f1": "F1"}


def task_scores(stats: PartStats) -> dict[str, float]:
    """A part's task scores where it has any: class agreement with FP32, detection F1."""
    return {k: float(v) for k, v in stats.as_dict().items() if k in TASK_SCORES and v is not None}


@dataclass
class QuantizeReport:
    """What a quantization run did: per node decisions and the headline numbers."""

    decisions: list[Decision]
    samples: int
    calibration_seconds: float
    float_bytes: int
    quantized_bytes: int
    notes: list[str] = field(default_factory=list)
    output_sqnr: dict[str, float] = field(default_factory=dict)  # dB, per part of a float output
    output_tasks: dict[str, dict[str, float]] = field(default_factory=dict)  # per part: scores
    candidates: list[Candidate] = field(default_factory=list)  # the plans --prefer chose from
    float_ms: float | None = None  # the float model on the candidates' feed, when they were timed
    readings: dict[str, Readings] = field(default_factory=dict)  # per output of decisions
    output_rows: dict[str, int] = field(default_factory=dict)  # per part: rows its top-k counts

    @property
    def quantized(self) -> list[Decision]:
        """The nodes with int8 in them: Q/DQ around them, or int8 weights only (`dynamic`)."""
        return [d for d in self.decisions if d.quantized or d.dynamic]

    @property
    def kept_float(self) -> list[Decision]:
        return [d for d in self.decisions if not (d.quantized or d.dynamic)]

    def summary(self, output: str | os.PathLike[str]) -> str:
        lines = [
            f"wrote {output}: {len(self.quantized)} of {len(self.decisions)} nodes quantized, "
            f"{self.float_bytes / 1e3:.1f} kB -> {self.quantized_bytes / 1e3:.1f} kB "
            f"({size_change(self.float_bytes, self.quantized_bytes)}); calibrated on "
            f"{self.samples} samples in {self.calibration_seconds:.2f} s"
        ]
        for what, decisions in (
            ("kept float", self.kept_float),
            ("int8 weights only", [d for d in self.decisions if d.dynamic]),
        ):
            by_op: dict[str, list[Decision]] = {}
            for d in decisions:
                by_op.setdefault(d.op_type, []).append(d)
            for op_type, group in sorted(by_op.items(), key=lambda kv: -len(kv[1])):
                first = group[0]
                more = f" and {len(group) - 1} more" if len(group) > 1 else ""
                lines.append(f"{what}: {op_type} {first.node}{more}: {first.reason}")
        if not self.quantized:
            lines.append(
                "warning: no node was quantized (each is kept float for the reason above): the "
                "file computes what the FP32 model computes, in float"
            )
        lines += [f"note: {n}" for n in self.notes]
        if self.candidates:
            shown = ", ".join(
                f"{c.name} {c.score:.2f} dB {c.latency_ms:.3f} ms{' (chosen)' if c.chosen else ''}"
                for c in self.candidates
            )
            if self.float_ms is not None:
                shown += f"; FP32 {self.float_ms:.3f} ms"
            lines.append(
                "candidate plans (worst output part, lower quartile of the samples, at least "
                f"{ENOUGH_DB:g} dB where a recognizer reads every sample as FP32 does; ms per "
                f"sample, 1 thread): {shown}"
            )
            lines += [f"note: {n}" for n in self.other_picks()]
            fastest = min(c.latency_ms for c in self.candidates)
            if self.float_ms is not None and fastest > self.float_ms + latency_tie(self.float_ms):
                smaller = self.quantized_bytes < self.float_bytes
                lines.append(
                    f"warning: no candidate plan runs faster than FP32 here ({fastest:.3f} ms "
                    f"against {self.float_ms:.3f} ms a sample, 1 thread): the int8 file is "
                    f"{'smaller, not faster' if smaller else 'neither smaller nor faster'}, on "
                    "this machine"
                )
        if self.output_sqnr:
            shown = ", ".join(
                f"{k!r} {v:.2f} dB{self._tasks(k)}" for k, v in self.output_sqnr.items()
            )
            count = min(self.samples, CHECK_SAMPLES)
            lines.append(f"output SQNR against FP32 on {count} calibration samples: {shown}")
            if min(self.output_sqnr.values()) < LOW_SQNR:
                lines.append(
                    f"warning: an output SQNR under {LOW_SQNR:g} dB: the INT8 model may not be "
                    "usable; `qdq compare` shows which layers hurt, `--target-sqnr` keeps the "
                    "most harmful ones float"
                )
        return "\n".join(lines)

    def other_picks(self) -> list[str]:
        """Where `--prefer accuracy` or `speed` would take another candidate: which, and at
        what score and time against the chosen one (the trade a user may want instead)."""
        chosen = next((c for c in self.candidates if c.chosen), None)
        if chosen is None:
            return []
        others = []
        for prefer in (Prefer.ACCURACY, Prefer.SPEED):
            other = pick(self.candidates, prefer)
            better = (
                other.score > chosen.score
                if prefer is Prefer.ACCURACY
                else other.latency_ms < chosen.latency_ms  # not a tie won by file size
            )
            if other.name != chosen.name and better:
                fp32 = f", {other.latency_ms / self.float_ms:.2f}x FP32's" if self.float_ms else ""
                others.append(
                    f"--prefer {prefer.value} takes {other.name!r} ({other.score:.2f} dB, "
                    f"{other.latency_ms / chosen.latency_ms:.2f}x the chosen plan's time{fp32})"
                )
        return ["; ".join(others)] if others else []

    def _tasks(self, part: str) -> str:
        scores, rows = self.output_tasks.get(part, {}), self.output_rows.get(part)
        shown = [
            f"{TASK_SCORES[k]} {round(v * rows)} of {rows}"  # 16 of 16 says how few were seen
            if rows and k != "detection_f1"
            else f"{TASK_SCORES[k]} {v:.3f}"
            for k, v in scores.items()
        ]
        if part in self.readings:  # a recognizer's text: what its user reads
            shown.append(self.readings[part].as_text())
        return f" ({', '.join(shown)})" if shown else ""


def size_change(before: int, after: int) -> str:
    """The file's change in size: "4.00x smaller", or "2.60x larger" where it grew (nothing
    int8 to shrink it)."""
    if after > before:
        return f"{after / before:.2f}x larger"
    return f"{before / after:.2f}x smaller"
