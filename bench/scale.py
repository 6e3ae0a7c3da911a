"""Wall time and peak memory of calibration, the accuracy search and evaluation against the
number of workers, local processes and Ray (docs/scale.md).

Run: python bench/scale.py [--model ppocr_cls] [--samples 2000] [--workers 1 2] [--ray]
    [--stages ...] [--repeat 3] [--one-thread] [--bound]
On the PP-OCR text-direction classifier (rapidocr's, `pip install -e '.[bench,ray]'`) with
`--samples` synthetic text lines, or EfficientNet-Lite0 on crops of photographs. Each
measurement runs in a fresh process, so that its peak resident memory (this process; local
workers separately, as the largest child) is its own. Ray's workers are not this process's
children: their memory is not in the table. `--repeat` runs every configuration again, in
turn (so that drift on the machine hits all alike), and ends with each one's median and its
ratio to the median of local 1. No asserts.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from model_files import efficientnet_lite0, rapidocr_model
from photos import photo_crops
from text_images import text_lines

SEARCH_SAMPLES = 128  # the search scores on the first 128 calibration samples anyway
STAGES = ("calibration", "search", "evaluation")
MODELS = ("ppocr_cls", "efficientnet_lite0")


def model_path(name: str) -> Path:
    if name == "ppocr_cls":
        return rapidocr_model("ch_ppocr_mobile_v2.0_cls_infer.onnx")
    return efficientnet_lite0()


def model_data(name: str, samples: int) -> np.ndarray:
    if name == "ppocr_cls":
        return text_lines(samples, 192, seed=3)[0]
    return photo_crops(samples, 224, seed=5)


def measure(
    stage: str, data: Path, workers: int, ray: bool, model: str, search_samples: int
) -> dict[str, float]:
    """One stage on `workers` local processes (or Ray; workers 0: one process whose sessions
    all take one thread, the work of one worker): wall seconds and peak RSS in MB."""
    import qdq.workers
    from qdq.config import preset_config
    from qdq.pipeline import quantize_model
    from qdq.report.compare import compare_models
    from qdq.workers import Workers

    source = model_path(model)
    where = Workers(ray="local") if ray else Workers(max(1, workers))
    if workers == 0:
        qdq.workers._THREADS = 1  # what a worker's sessions get; the bound of 2 workers: half
    if ray:
        import ray as ray_module

        ray_module.init(num_cpus=workers, include_dashboard=False, log_to_driver=False)
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "q.onnx"
        start = time.perf_counter()
        if stage == "calibration":
            config = preset_config("default", sequential_bias_correction=False, workers=where)
            quantize_model(source, out, data, config)
        elif stage == "search":
            config = preset_config(
                "default", target_sqnr=60.0, max_samples=search_samples, workers=where
            )
            with _timed_search() as searched:
                quantize_model(source, out, data, config)
        else:
            # every layer int8 (--prefer int8): --prefer balanced or speed keeps this classifier's
            # convolutions float (faster here), and evaluation would pair 1 layer, not 60
            config = preset_config("default", max_samples=16, prefer="int8")
            quantize_model(source, out, data, config)
            start = time.perf_counter()
            compare_models(source, out, data, latency_runs=0, workers=where)
        seconds = time.perf_counter() - start
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    child = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    result = {"seconds": seconds, "peak_mb": own, "worker_peak_mb": child}
    if stage == "search":  # the search stage alone, without calibration and the other stages
        result["search_seconds"] = searched[0]
    return result


@contextlib.contextmanager
def _timed_search() -> Iterator[list[float]]:
    """The wall seconds of the pipeline's accuracy search (`meet_target`), once it has run."""
    import qdq.ptq

    search, searched = qdq.ptq.meet_target, []

    def timed(*args: object, **kwargs: object) -> object:
        start = time.perf_counter()
        try:
            return search(*args, **kwargs)
        finally:
            searched.append(time.perf_counter() - start)

    qdq.ptq.meet_target = timed
    try:
        yield searched
    finally:
        qdq.ptq.meet_target = search


def ort_runs(model: Path, data: Path, threads: int, runs: int = 200) -> float:
    """Seconds for `runs` ONNX Runtime runs of a batch of 16 on `threads` threads."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: np.load(data, mmap_mode="r")[:16].copy()}
    session.run(None, feed)
    start = time.perf_counter()
    for _ in range(runs):
        session.run(None, feed)
    return time.perf_counter() - start


def bound(model: Path, data: Path) -> None:
    """Is two workers' bound physical? The same runs alone on one thread, in one process on
    two threads, and in two processes at once on one thread each."""
    import multiprocessing

    alone, two_threads = ort_runs(model, data, 1), ort_runs(model, data, 2)
    with multiprocessing.get_context("fork").Pool(2) as pool:
        both = pool.starmap(ort_runs, [(model, data, 1)] * 2)
    print(
        f"ONNX Runtime, batch of 16: 1 thread {alone:.2f} s; 2 threads {two_threads:.2f} s "
        f"({alone / two_threads:.2f}x faster); two processes at once on 1 thread: "
        f"{both[0]:.2f} and {both[1]:.2f} s (the slower {max(both) / alone:.2f}x its time alone)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=MODELS, default=MODELS[0])
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--search-samples", type=int, default=SEARCH_SAMPLES)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--ray", action="store_true", help="also on Ray (local, --workers CPUs)")
    parser.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES))
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument(
        "--one-thread", action="store_true", help="also one process with one-thread sessions"
    )
    parser.add_argument("--bound", action="store_true", help="time ONNX Runtime's threads only")
    parser.add_argument("--one", nargs=6, help=argparse.SUPPRESS)  # stage data workers ray ...
    args = parser.parse_args()
    if args.one:
        stage, data, workers, ray, model, search = args.one
        print(json.dumps(measure(stage, Path(data), int(workers), ray == "1", model, int(search))))
        return
    with tempfile.TemporaryDirectory() as folder:
        data = Path(folder) / "samples.npy"
        np.save(data, model_data(args.model, args.samples))
        if args.bound:
            for _ in range(args.repeat):
                bound(model_path(args.model), data)
            return
        print(f"{args.model}, {args.samples} samples; seconds, peak RSS MB; load {_load()}")
        print(f"{'stage':<12} {'where':<10} {'seconds':>8} {'driver MB':>10} {'worker MB':>10}")
        runs = [(w, False) for w in args.workers] + [(w, True) for w in args.workers if args.ray]
        runs += [(0, False)] if args.one_thread else []
        seconds: dict[tuple[str, str], list[float]] = {}
        for _ in range(args.repeat):
            for stage in args.stages:
                for workers, ray in runs:
                    one = [stage, str(data), str(workers), "1" if ray else "0", args.model]
                    done = subprocess.run(
                        [sys.executable, __file__, "--one", *one, str(args.search_samples)],
                        capture_output=True,
                        text=True,
                    )
                    if done.returncode:
                        print(f"{stage} failed: {done.stderr.strip().splitlines()[-1:]}")
                        continue
                    m = json.loads(done.stdout.strip().splitlines()[-1])
                    where = f"{'ray' if ray else 'local'} {workers or '1t'}"
                    seconds.setdefault((stage, where), []).append(m["seconds"])
                    if "search_seconds" in m:
                        seconds.setdefault(("search stage", where), []).append(m["search_seconds"])
                    print(
                        f"{stage:<12} {where:<10} {m['seconds']:>8.2f} {m['peak_mb']:>10.0f} "
                        f"{m['worker_peak_mb']:>10.0f}"
                        + (
                            f"  (search stage {m['search_seconds']:.2f})"
                            if "search_seconds" in m
                            else ""
                        ),
                        flush=True,
                    )
        if args.repeat > 1:
            print(f"medians of {args.repeat} runs (against local 1); load {_load()}")
            for (stage, where), values in seconds.items():
                median = float(np.median(values))
                base = seconds.get((stage, "local 1"))
                ratio = f" ({median / float(np.median(base)):.2f}x)" if base else ""
                if base and where == "local 1t":  # two such workers at best: half of it
                    ratio += f", half of it {median / 2 / float(np.median(base)):.2f}x"
                print(f"{stage:<12} {where:<10} {median:>8.2f}{ratio}")


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


if __name__ == "__main__":
    main()
