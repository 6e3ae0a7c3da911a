"""INT8/FP32 latency of qdq's and the peers' files of one model, timed in one interleaved loop.

Run: python bench/peers_latency.py MODEL LABEL=TOOL:CONFIG[:QDQ FLAGS] ... [--out DIR] [--runs 60]
e.g. python bench/peers_latency.py magika qdq=qdq:default "acc=qdq:default:--prefer accuracy" \
         ort=ort:minmax_matmul
bench/peers.py times each file against FP32 when it makes it, on a shared machine minutes or
hours apart from the others; this quantizes each file on draw 0 with the command peers.py runs
(the same data, the same configuration names; files kept in --out and reused), then times FP32
and every file in rotation in one process (1 thread, median of --runs, peers.py's timing feed
for the model), and prints each file's task metric on the evaluation set and its INT8/FP32
ratio. Needs what bench/peers.py needs. No asserts.
"""

from __future__ import annotations

import argparse
import subprocess
from pathlib import Path

import peers_models
import peers_tools
import unseen
from ptq import medians

HERE = Path(__file__).parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("files", nargs="+", help="LABEL=TOOL:CONFIG[:extra qdq flags]")
    parser.add_argument("--out", type=Path, default=HERE / "out" / "peers_latency")
    parser.add_argument("--peers", type=Path, default=Path("/work/peers"))
    parser.add_argument("--runs", type=int, default=60)
    args = parser.parse_args()
    b = peers_models.bench(args.model, HERE / "out" / "peers", 1)
    feed, _ = b.evaluation()
    reference = b.run(b.model, feed)
    folder = args.out / args.model
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for spec in args.files:
        label, rest = spec.split("=", 1)
        tool, config, *extra = rest.split(":", 2)
        path = folder / f"{label}.onnx"
        if not path.exists():
            command = peers_tools.command(tool, config, b.model, path, b.calibration(0), args.peers)
            subprocess.run(command + (extra[0].split() if extra else []), check=True)
        paths[label] = path
    metrics = {label: b.score(reference, b.run(path, feed)) for label, path in paths.items()}
    files = [b.model, *paths.values()]
    if args.model in unseen.MODELS:
        timing = unseen.timing_feed(unseen.MODELS[args.model], feed)
        ms = unseen.interleaved(files, timing, args.runs)
    else:
        task = next(t for t in peers_models.ptq_tasks(0) if t.name == args.model)
        (x,) = feed.values()
        ms = medians(files, x[: task.latency_batch], args.runs)
    print(f"| {args.model} | FP32 {ms[0]:.3f} ms |")
    for (label, _), took in zip(paths.items(), ms[1:], strict=True):
        print(f"| {label} | {metrics[label]:.4f} | {took:.3f} ms | {took / ms[0]:.2f}x |")


if __name__ == "__main__":
    main()
