"""`qdq quantize-many MANIFEST`: a model zoo quantized from one TOML manifest.

```toml
[defaults]                    # options for every model: `preset_config`'s names
preset = "default"
method = "percentile"

[[model]]
name = "cnn"
model = "cnn.onnx"            # paths are relative to the manifest's folder
calib = "calib.npz"
output = "out/cnn_int8.onnx"
options = { weight_bits = 4 } # this model's own, over the defaults
```

Each model gets its output and a report beside it (`OUTPUT.report.txt`, written last); a model
whose report exists is done and skipped, so an interrupted run resumes where it stopped. One
model's failure is recorded in the summary and never stops the others.
"""

from __future__ import annotations

import logging
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

from qdq.config import preset_config
from qdq.errors import QdqError, UsageError, first_line
from qdq.pipeline import quantize_model
from qdq.workers import ONE_PROCESS, Workers

log = logging.getLogger(__name__)
REQUIRED = ("name", "model", "calib", "output")


@dataclass(frozen=True)
class Entry:
    """One model of the manifest, its paths resolved and its options merged."""

    name: str
    model: Path
    calib: Path
    output: Path
    options: dict[str, object]

    @property
    def report(self) -> Path:
        return self.output.with_name(self.output.name + ".report.txt")


@dataclass(frozen=True)
class Outcome:
    """What became of one model: "done", "skipped" (done before) or "failed: why"."""

    name: str
    status: str
    seconds: float = 0.0
    ratio: float | None = None  # float size / quantized size
    sqnr_db: float | None = None  # worst output's SQNR on the calibration check


def read_manifest(path: str | Path) -> list[Entry]:
    """The manifest's models, checked: required keys present, names unique."""
    path = Path(path)
    try:
        manifest = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise UsageError(f"{path} is not a readable TOML manifest ({error})") from None
    defaults = manifest.get("defaults", {})
    entries = []
    for i, model in enumerate(manifest.get("model", [])):
        missing = [key for key in REQUIRED if key not in model]
        if missing:
            raise UsageError(f"{path}: [[model]] number {i + 1} lacks {missing}; give {REQUIRED}")
        where = {key: path.parent / str(model[key]) for key in ("model", "calib", "output")}
        options = {**defaults, **model.get("options", {})}
        entries.append(Entry(str(model["name"]), options=options, **where))
    names = [e.name for e in entries]
    if not entries or len(set(names)) != len(names):
        raise UsageError(f"{path}: give one or more [[model]] tables with distinct names")
    return entries


def quantize_many(entries: list[Entry], workers: Workers = ONE_PROCESS) -> list[Outcome]:
    """Each model quantized in turn (its work on `workers`), done ones skipped, failures kept."""
    outcomes = []
    for entry in entries:
        if entry.report.exists() and entry.output.exists():
            outcomes.append(Outcome(entry.name, "skipped"))
            continue
        start = time.perf_counter()
        try:
            outcomes.append(_quantize(entry, workers, start))
        except Exception as error:  # QdqError, ONNX Runtime's own, a bug: the others go on
            reason = first_line(error)
            if not isinstance(error, QdqError):
                log.warning("%s failed", entry.name, exc_info=True)
            outcomes.append(Outcome(entry.name, f"failed: {reason}"))
    return outcomes


def _quantize(entry: Entry, workers: Workers, start: float) -> Outcome:
    options = {k: tuple(v) if isinstance(v, list) else v for k, v in entry.options.items()}
    preset = str(options.pop("preset", "default"))
    try:
        config = preset_config(preset, workers=workers, **options)
    except TypeError as error:  # an unknown option name
        raise UsageError(f"options of {entry.name!r}: {error}") from None
    entry.output.parent.mkdir(parents=True, exist_ok=True)
    report = quantize_model(entry.model, entry.output, entry.calib, config)
    entry.report.write_text(report.summary(entry.output) + "\n")
    worst = min(report.output_sqnr.values(), default=None)
    ratio = report.float_bytes / report.quantized_bytes
    return Outcome(entry.name, "done", time.perf_counter() - start, ratio, worst)


def summary_table(outcomes: list[Outcome]) -> str:
    """One line per model: status, time, size ratio, worst output SQNR."""
    lines = [f"{'model':<20} {'status':<10} {'seconds':>8} {'smaller':>8} {'SQNR dB':>8}"]
    for o in outcomes:
        status, _, why = o.status.partition(": ")
        ratio = f"{o.ratio:.2f}x" if o.ratio else "-"
        sqnr = f"{o.sqnr_db:.2f}" if o.sqnr_db is not None else "-"
        seconds = f"{o.seconds:.1f}" if o.status == "done" else "-"
        line = f"{o.name:<20} {status:<10} {seconds:>8} {ratio:>8} {sqnr:>8}"
        lines.append(line + (f"  {why}" if why else ""))
    return "\n".join(lines)
