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

A folder of pictures as `calib` takes the image flags as options (`image_size = [224, 224]`,
`mean`, `std`, `value_scale`, `layout`, `channel_order`), as `qdq quantize` takes them; a
data-free model (`options = { data_free = true }`) takes no `calib`. An option `qdq quantize`
does not have is refused, with the nearest name, before any model is quantized.

Each model gets its output and a report beside it (`OUTPUT.report.txt`, written last); a model
whose report exists is done and skipped, so an interrupted run resumes where it stopped. One
model's failure is recorded in the summary and never stops the others; the command then exits
2, naming the models that failed.
"""

from __future__ import annotations

import contextlib
import difflib
import logging
import os
import tempfile
import time
import tomllib
import traceback
from dataclasses import dataclass, fields
from pathlib import Path

from qdq.arrayfile import check_regular
from qdq.config import QuantConfig, preset_config
from qdq.errors import ArgumentError, QdqError, UsageError, expect, first_line
from qdq.images import ImageOptions
from qdq.onnx.model import external_data_files
from qdq.outputs import check_output, replaced_together, staged
from qdq.pipeline import quantize_model
from qdq.workers import ONE_PROCESS, Workers

log = logging.getLogger(__name__)
REQUIRED = ("name", "model", "calib", "output")  # `calib` unless the options say data_free
# preset_config's own options beside QuantConfig's fields, and the manifest's
GRID_OPTIONS = ("preset", "seed", "per_channel", "weight_bits", "activation_dtype")
# the image flags' option names, and ImageOptions' fields
IMAGE_OPTIONS = {
    "image_size": "size",
    "mean": "mean",
    "std": "std",
    "value_scale": "value_scale",
    "layout": "layout",
    "channel_order": "channel_order",
}


@dataclass(frozen=True)
class Entry:
    """One model of the manifest, its paths resolved and its options merged."""

    name: str
    model: Path
    calib: Path | None  # None: data-free
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
    """The manifest's models, checked before any work: tables and strings where they belong,
    no unknown table or key, required keys present, names printable and unique, and no output
    that is another entry's output, an input of any entry, a report, or the manifest itself
    (written in turn, it would be read or overwritten later)."""
    expect(path, (str, os.PathLike), "the manifest's path")
    path = Path(path)
    check_regular(path, "a TOML manifest")  # a FIFO would block
    try:
        manifest = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise UsageError(f"{path} is not a readable TOML manifest ({error})") from None
    unknown = sorted(set(manifest) - {"defaults", "model"})
    if unknown:  # a misspelt [defaults] was never read
        raise UsageError(
            f"{path}: unknown tables {unknown}; a manifest holds [defaults] and [[model]]"
        )
    defaults, models = manifest.get("defaults", {}), manifest.get("model", [])
    if not isinstance(defaults, dict):
        raise UsageError(f'{path}: [defaults] must be a table of options, e.g. method = "kl"')
    if not isinstance(models, list) or not all(isinstance(m, dict) for m in models):
        raise UsageError(f"{path}: give each model as a [[model]] table")
    entries = []
    for i, model in enumerate(models):
        where = f"{path}: [[model]] number {i + 1}"
        own = model.get("options", {})  # not a table: refused below
        options = {**defaults, **(own if isinstance(own, dict) else {})}
        data_free = bool(options.get("data_free"))
        if data_free and "calib" in model:
            raise UsageError(f"{where}: data_free uses no calibration data; drop calib")
        required = tuple(k for k in REQUIRED if k != "calib" or not data_free)
        missing = [key for key in required if key not in model]
        if missing:
            raise UsageError(f"{where} lacks {missing}; give {required}")
        unknown = sorted(set(model) - {*REQUIRED, "options"})
        if unknown:  # `optons = {...}` was never read
            raise UsageError(f"{where}: unknown keys {unknown}; options go in options = {{...}}")
        name = model["name"]  # a newline or an ESC sequence would forge lines of the table
        if not isinstance(name, str) or not name or not name.isprintable():
            raise UsageError(f"{where}: name must be a printable string, got {name!r:.60}")
        paths = ("model", "calib", "output") if "calib" in model else ("model", "output")
        wrong = [key for key in paths if not isinstance(model[key], str) or not model[key]]
        if wrong:
            raise UsageError(f"{where}: {wrong} must be non-empty strings (paths)")
        if not isinstance(model.get("options", {}), dict):
            raise UsageError(f"{where}: options must be a table, e.g. options = {{ seed = 1 }}")
        if "workers" in {**defaults, **model.get("options", {})}:
            raise UsageError(f"{where}: workers is the command's own: give --workers instead")
        if model["output"].endswith(("/", "\\")):
            raise UsageError(f"{where}: output {model['output']!r} is a folder; give a file name")
        _check_options(where, options)
        files = {key: path.parent / model[key] for key in paths}
        entries.append(Entry(model["name"], options=options, **{"calib": None, **files}))
    if not entries:
        raise UsageError(f"{path}: give one or more [[model]] tables")
    first: dict[str, int] = {}
    for i, entry in enumerate(entries, start=1):
        if entry.name in first:
            raise UsageError(
                f"{path}: [[model]] number {i}: name {entry.name!r} is also number "
                f"{first[entry.name]}'s; give each model a name of its own"
            )
        first[entry.name] = i
    try:
        _check_outputs(path, entries)
    except (OSError, RuntimeError) as error:  # a path that cannot resolve (a symlink loop)
        raise UsageError(f"{path}: a path of it does not resolve ({error})") from None
    return entries


def _check_options(where: str, options: dict[str, object]) -> None:
    """Every option names a setting `qdq quantize` has (a misspelt one had ended in Python's
    "unexpected keyword argument" when its model's turn came)."""
    known = {f.name for f in fields(QuantConfig)} | set(IMAGE_OPTIONS) | set(GRID_OPTIONS)
    for name in options:
        if name not in known:
            near = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.6)
            hint = f"did you mean {near[0]}?" if near else f"the options are {sorted(known)}"
            raise UsageError(f"{where}: unknown option {name!r}; {hint}")


def _check_outputs(manifest: Path, entries: list[Entry]) -> None:
    """Refuse an output that another entry writes too, or that is read: any entry's model or
    calibration data (or lies in its folder of samples), a report, or the manifest."""
    read = {manifest.resolve(): "the manifest"}
    for e in entries:
        read[e.model.resolve()] = f"{e.name}'s model"
        if e.calib is not None:
            read[e.calib.resolve()] = f"{e.name}'s calib"
    # a folder read is looked up among each target's parents: scanning every source for each
    # target (a stat each) took 45 s for 2000 entries
    folders = {source: why for source, why in read.items() if source.is_dir()}
    # a model's external weights, looked up where a target lies beside the model (reading
    # every model of a large zoo would cost more than it protects)
    beside: dict[Path, list[Entry]] = {}
    for e in entries:
        beside.setdefault(e.model.resolve().parent, []).append(e)
    weights: dict[Path, str] = {}
    for e in entries:
        for target in (e.output.resolve(), e.report.resolve()):
            for other in beside.pop(target.parent, []):
                files = external_data_files(other.model)
                weights |= {f.resolve(): f"{other.name}'s model's weights" for f in files}
    read |= weights
    written: dict[Path, str] = {}
    for e in entries:
        for target, what in ((e.output.resolve(), "output"), (e.report.resolve(), "report")):
            inside = (folders[p] for p in target.parents if p in folders)
            clash = written.get(target) or read.get(target) or next(inside, None)
            if clash:
                raise UsageError(
                    f"{manifest}: {e.name}'s {what} {target} is also {clash}; give each model "
                    "an output of its own, apart from every input"
                )
            written[target] = f"{e.name}'s {what}"


def quantize_many(entries: list[Entry], workers: Workers = ONE_PROCESS) -> list[Outcome]:
    """Each model quantized in turn (its work on `workers`), done ones skipped, failures kept:
    a model's own bad input as its one line, anything else also with the log file holding its
    traceback."""
    if not isinstance(entries, list | tuple) or not all(isinstance(e, Entry) for e in entries):
        raise ArgumentError("entries must be a list of Entry, as read_manifest returns them")
    expect(workers, Workers, "workers", "e.g. qdq.workers.Workers(count=2)")
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
            if not isinstance(error, QdqError | OSError):
                log.info("%s failed", entry.name, exc_info=True)  # -v prints it
                with tempfile.NamedTemporaryFile(
                    "w", prefix="qdq-error-", suffix=".log", delete=False
                ) as saved:
                    saved.write("".join(traceback.format_exception(error)))
                reason = f"internal error ({type(error).__name__}: {reason}; see {saved.name})"
            outcomes.append(Outcome(entry.name, f"failed: {reason}"))
    return outcomes


def _quantize(entry: Entry, workers: Workers, start: float) -> Outcome:
    options = {k: tuple(v) if isinstance(v, list) else v for k, v in entry.options.items()}
    preset = str(options.pop("preset", "default"))
    seed = options.pop("seed", None)
    pictures = {field: options.pop(key) for key, field in IMAGE_OPTIONS.items() if key in options}
    try:
        config = preset_config(preset, workers=workers, **options)
        images = ImageOptions(**pictures)
    except TypeError as error:  # an unknown option name
        raise UsageError(f"options of {entry.name!r}: {first_line(error)}") from None
    folder = entry.output.parent
    made = [f for f in (folder, *folder.parents) if not f.exists()]  # deepest first
    folder.mkdir(parents=True, exist_ok=True)
    try:
        for target, what in ((entry.output, "output"), (entry.report, "report")):
            inputs = [entry.model] + ([entry.calib] if entry.calib is not None else [])
            check_output(target, inputs, f"{entry.name}'s {what}")
        with replaced_together([entry.output, entry.report]):  # the report marks it done
            report = quantize_model(entry.model, entry.output, entry.calib, config, images, seed)
            with staged(entry.report) as temporary:
                temporary.write_text(report.summary(entry.output) + "\n")
    except BaseException:
        for empty in made:  # a failed model leaves nothing, not even its folders
            with contextlib.suppress(OSError):
                empty.rmdir()
        raise
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
