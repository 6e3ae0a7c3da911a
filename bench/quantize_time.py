"""Quantize time: qdq's default against ONNX Runtime's quantize_static MinMax, per model.

Run: python bench/quantize_time.py [--models cnn nudenet ...] [--samples 128 512] [--out bench/out]
Every model of bench/ptq.py and bench/unseen.py, at each sample count: qdq's default
(`quantize_model` with no options) and `quantize_static` MinMax per channel in QDQ format (after
its `quant_pre_process`, as bench/ptq.py runs it), each in a fresh process, back to back on the
same samples read lazily from one .npy per sample (batches of 16, or 1 where the batch axis is
fixed at 1). The time is the quantize call's own wall time, without interpreter start-up and
imports. Prints a Markdown table with the ratio qdq / ORT (also written to --out/quantize_time.md).
No asserts: numbers for docs/ptq.md; on a shared machine, compare the ratio, not the seconds.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnxruntime as ort

from datasets import tasks
from ptq import quantize_static_qdq, save_samples
from unseen import MODELS, locate

TOOLS = ("qdq", "ort")


def child(tool: str, model: Path, data: Path, out: Path) -> float:
    """Seconds one tool takes to quantize `model` on the samples in `data`."""
    files = sorted(data.glob("*.npy"))
    if tool == "qdq":
        from qdq.pipeline import quantize_model

        start = time.perf_counter()
        quantize_model(model, out, data)
        return time.perf_counter() - start
    spec = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"]).get_inputs()[0]
    step = 1 if spec.shape[0] == 1 else 16

    class Reader:
        def __init__(self) -> None:
            self.batches = (files[i : i + step] for i in range(0, len(files), step))

        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(self.batches, None)
            return None if batch is None else {spec.name: np.stack([np.load(f) for f in batch])}

    start = time.perf_counter()
    quantize_static_qdq(model, out, Reader(), "MinMax", True)
    return time.perf_counter() - start


def timed(tool: str, model: Path, data: Path, tmp: Path) -> float | None:
    """The tool's seconds in a fresh process, or None when it fails."""
    out = tmp / f"{tool}.onnx"
    command = [sys.executable, __file__, "--child", tool, str(model), str(data), str(out)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=Path(__file__).parent)
    if done.returncode:
        print(f"{tool} failed on {model.name}: {done.stderr.strip()[-300:]}", file=sys.stderr)
        return None
    return float(json.loads(done.stdout.strip().splitlines()[-1])["seconds"])


def models(most: int, names: list[str]) -> Iterator[tuple[str, Path, np.ndarray]]:
    """(name, file, `most` calibration samples) per model asked, each model's data made only
    when its turn comes (the layout model's 512 pages alone hold 3.7 GB)."""
    found = {t.name: (Path(t.model), t.calib) for t in tasks(most) if t.name in names}
    for name in names:
        if name in found:
            yield name, *found.pop(name)
        else:
            yield name, locate(MODELS[name]), MODELS[name].data(most, 1)[0]


def main() -> None:
    every = [t.name for t in tasks(0)] + list(MODELS)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=every, default=every)
    parser.add_argument("--samples", nargs="+", type=int, default=[128, 512])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "out")
    parser.add_argument("--child", nargs=4, metavar=("TOOL", "MODEL", "DATA", "OUT"))
    args = parser.parse_args()
    if args.child:
        tool, model, data, out = args.child
        print(json.dumps({"seconds": child(tool, Path(model), Path(data), Path(out))}))
        return
    rows = [
        "| model | samples | qdq s | ORT MinMax per-ch s | qdq / ORT |",
        "|---|---|---|---|---|",
    ]
    for name, model, x in models(max(args.samples), args.models):
        for count in args.samples:
            with tempfile.TemporaryDirectory() as tmp:
                data = save_samples(x[:count], Path(tmp) / "data")
                qdq, ours = (timed(tool, model, data, Path(tmp)) for tool in TOOLS)
            ratio = f"{qdq / ours:.2f}" if qdq and ours else "-"
            cells = [f"{s:.1f}" if s else "fails" for s in (qdq, ours)]
            rows.append(f"| {name} | {count} | {cells[0]} | {cells[1]} | {ratio} |")
            print(rows[-1], flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "quantize_time.md").write_text("\n".join(rows) + "\n")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
