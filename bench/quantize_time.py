"""Quantize time: qdq's default against ONNX Runtime's quantize_static MinMax, per model.

Run: python bench/quantize_time.py [--models cnn nudenet ...] [--samples 128 512] [--stages]
                                   [--baseline OTHER_CHECKOUT] [--repeat N]
Every model of bench/ptq.py and bench/unseen.py, at each sample count: qdq's default
(`quantize_model` with no options) and `quantize_static` MinMax per channel in QDQ format (after
its `quant_pre_process`, as bench/ptq.py runs it), each in a fresh process, back to back on the
same samples read lazily from one .npy per sample (batches of 16, or 1 where the batch axis is
fixed at 1). The time is the quantize call's own wall time, without interpreter start-up and
imports. Prints a Markdown table with the ratio qdq / ORT (also written to --out/quantize_time.md);
with --stages, also qdq's seconds per stage (timers around the pipeline's functions). With
--baseline, qdq from another checkout's src/ too (an older commit: `git worktree add`), run
between the two, for a before/after under the same load; --repeat N runs each N times,
interleaved, and keeps each one's fastest (the load moves single runs by 10-25%).
No asserts: numbers for docs/ptq.md; on a shared machine, compare the ratio, not the seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import onnxruntime as ort

from datasets import tasks
from ptq import quantize_static_qdq, save_samples
from unseen_models import MODELS, prepared

TOOLS = ("qdq", "ort")
Samples = np.ndarray | dict[str, np.ndarray]
# qdq's stages: the pipeline's functions timed (the one-shot bias correction and GPTQ's codes
# run once per plan built, inside the method choice and the candidate plans too).
STAGES = {
    "_smoothed": "smoothing",
    "observe_holding": "calibration",
    "hessians": "GPTQ's H",
    "rounded_codes": "GPTQ's codes",
    "_best_method": "method choice",
    "slow_pools": "layout probe",
    "_frontier": "candidate plans",
    "_gptq_pays": "rounding check",
    "correct_biases": "one-shot correction",
    "correct_sequentially": "sequential correction",
    "_correction_pays": "correction check",
    "_output_check": "output check",
}


def child(tool: str, model: Path, data: Path, out: Path) -> tuple[float, dict[str, float]]:
    """Seconds one tool takes to quantize `model` on the samples in `data`, and qdq's seconds
    per stage."""
    if tool == "qdq":
        import qdq.pipeline

        # the planning stages live in qdq.ptq (which the pipeline imports), or in qdq.pipeline
        # in a --baseline from before it
        modules = [m for m in (qdq.pipeline, sys.modules.get("qdq.ptq")) if m]
        stages: dict[str, float] = defaultdict(float)
        for name, stage in STAGES.items():
            for module in (m for m in modules if hasattr(m, name)):
                setattr(module, name, _timed(getattr(module, name), stage, stages))
        start = time.perf_counter()
        qdq.pipeline.quantize_model(model, out, data)
        return time.perf_counter() - start, stages
    specs = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"]).get_inputs()
    step = 1 if any(spec.shape[0] == 1 for spec in specs) else 16

    class Reader:
        def __init__(self) -> None:
            if data.suffix == ".npz":  # several inputs, by name
                with np.load(data) as saved:
                    arrays = {k: saved[k] for k in saved.files}
                count = len(next(iter(arrays.values())))
                self.batches = (
                    {k: v[i : i + step] for k, v in arrays.items()} for i in range(0, count, step)
                )
            else:
                files = sorted(data.glob("*.npy"))
                self.batches = (
                    {specs[0].name: np.stack([np.load(f) for f in files[i : i + step]])}
                    for i in range(0, len(files), step)
                )

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.batches, None)

    start = time.perf_counter()
    quantize_static_qdq(model, out, Reader(), "MinMax", True)
    return time.perf_counter() - start, {}


def _timed(function: Callable, stage: str, stages: dict[str, float]) -> Callable:
    """`function`, adding its seconds to `stages[stage]`."""

    def run(*args: object, **kwargs: object) -> object:
        start = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            stages[stage] += time.perf_counter() - start

    return run


def timed(
    tool: str, model: Path, data: Path, tmp: Path, source: Path | None = None
) -> tuple[float, dict] | None:
    """The tool's seconds (and qdq's per stage) in a fresh process, or None when it fails;
    qdq imported from `source` (a checkout's src/) where given."""
    out = tmp / f"{tool}.onnx"
    command = [sys.executable, __file__, "--child", tool, str(model), str(data), str(out)]
    env = dict(os.environ, PYTHONPATH=str(source)) if source else None
    done = subprocess.run(
        command, capture_output=True, text=True, cwd=Path(__file__).parent, env=env
    )
    if done.returncode:
        print(f"{tool} failed on {model.name}: {done.stderr.strip()[-300:]}", file=sys.stderr)
        return None
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return float(result["seconds"]), result["stages"]


def models(most: int, names: list[str]) -> Iterator[tuple[str, Path, Samples]]:
    """(name, file, `most` calibration samples: one array, or one per input by name) per model
    asked, each model's data made only when its turn comes (the layout model's 512 pages alone
    hold 3.7 GB); bench/unseen.py's models as it quantizes them (after their `prepare`; a huge
    one on at most the samples its bench calibrates on)."""
    found = {t.name: (Path(t.model), t.calib) for t in tasks(most) if t.name in names}
    for name in names:
        if name in found:
            yield name, *found.pop(name)
        else:
            model = MODELS[name]
            source = prepared(model)
            # a huge model's bench count (the nucleus segmenter: 4 tiles of 3.1 GiB activations)
            yield name, source, model.data(min(most, model.calibrate) if model.huge else most, 1)[0]


def save(samples: Samples, count: int, folder: Path) -> Path:
    """The first `count` samples on disk: one .npy per sample, so that both tools read them
    lazily (peak RSS stays theirs), or an .npz of the arrays by input name for several."""
    if isinstance(samples, np.ndarray):
        return save_samples(samples[:count], folder / "data")
    np.savez(folder / "data.npz", **{k: v[:count] for k, v in samples.items()})
    return folder / "data.npz"


def main() -> None:
    every = [t.name for t in tasks(0)] + list(MODELS)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=every, default=every)
    parser.add_argument("--samples", nargs="+", type=int, default=[128, 512])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "out")
    parser.add_argument("--stages", action="store_true", help="also qdq's seconds per stage")
    parser.add_argument("--baseline", type=Path, help="another checkout whose qdq to time too")
    parser.add_argument("--repeat", type=int, default=1, help="runs per tool (the fastest kept)")
    parser.add_argument("--child", nargs=4, metavar=("TOOL", "MODEL", "DATA", "OUT"))
    args = parser.parse_args()
    if args.child:
        tool, model, data, out = args.child
        seconds, stages = child(tool, Path(model), Path(data), Path(out))
        print(json.dumps({"seconds": seconds, "stages": stages}))
        return
    runs = {"qdq": None, "ort": None}
    if args.baseline:
        runs = {"baseline": args.baseline / "src", **runs}
    shown = {"qdq": "qdq s", "ort": "ORT MinMax per-ch s", "baseline": "baseline qdq s"}
    ratios = [f"{tool} / ORT" for tool in runs if tool != "ort"]
    rows = [
        f"| model | samples | {' | '.join(shown[t] for t in runs)} | {' | '.join(ratios)} |",
        "|---|---|" + "---|" * (len(runs) + len(ratios)),
    ]
    stage_rows = [
        f"| model | samples | {' | '.join(STAGES.values())} |",
        "|---|---|" + "---|" * len(STAGES),
    ]
    for name, model, x in models(max(args.samples), args.models):
        held = len(x) if isinstance(x, np.ndarray) else len(next(iter(x.values())))
        for count in sorted({min(count, held) for count in args.samples}):
            with tempfile.TemporaryDirectory() as tmp:
                data = save(x, count, Path(tmp))
                found = {tool: [] for tool in runs}
                for _ in range(args.repeat):  # interleaved: each tool under the same load
                    for tool, source in runs.items():
                        kind = "ort" if tool == "ort" else "qdq"
                        one = timed(kind, model, data, Path(tmp), source)
                        if one:
                            found[tool].append(one)
            best = {t: min(f, key=lambda r: r[0]) if f else None for t, f in found.items()}
            ort_s = best["ort"][0] if best["ort"] else None
            cells = [f"{b[0]:.1f}" if b else "fails" for b in best.values()]
            cells += [
                f"{best[t][0] / ort_s:.2f}" if best[t] and ort_s else "-"
                for t in runs
                if t != "ort"
            ]
            rows.append(f"| {name} | {count} | {' | '.join(cells)} |")
            print(rows[-1], flush=True)
            if best["qdq"]:
                seconds = (f"{best['qdq'][1].get(stage, 0.0):.1f}" for stage in STAGES.values())
                stage_rows.append(f"| {name} | {count} | {' | '.join(seconds)} |")
                print(stage_rows[-1], flush=True)
    tables = [rows, stage_rows] if args.stages else [rows]
    text = "\n\n".join("\n".join(table) for table in tables) + "\n"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "quantize_time.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
