"""Wall time and peak memory of calibration, the accuracy search and evaluation against the
number of workers, local processes and Ray (docs/scale.md).

Run: python bench/scale.py [--samples 2000] [--workers 1 2] [--ray]
On the PP-OCR text-direction classifier (rapidocr's, `pip install -e '.[bench,ray]'`) with
`--samples` synthetic text lines. Each measurement runs in a fresh process, so that its peak
resident memory (this process; local workers separately, as the largest child) is its own.
Ray's workers are not this process's children: their memory is not in the table. No asserts.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from datasets import rapidocr_model, text_lines

MODEL = rapidocr_model("ch_ppocr_mobile_v2.0_cls_infer.onnx")
SEARCH_SAMPLES = 128  # the search scores on the first 128 calibration samples anyway
STAGES = ("calibration", "search", "evaluation")


def measure(stage: str, data: Path, workers: int, ray: bool) -> dict[str, float]:
    """One stage on `workers` local processes (or Ray): wall seconds and peak RSS in MB."""
    from qdq.config import preset_config
    from qdq.pipeline import quantize_model
    from qdq.report.compare import compare_models
    from qdq.workers import Workers

    where = Workers(ray="local") if ray else Workers(workers)
    if ray:
        import ray as ray_module

        ray_module.init(num_cpus=workers, include_dashboard=False, log_to_driver=False)
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "q.onnx"
        start = time.perf_counter()
        if stage == "calibration":
            config = preset_config("default", sequential_bias_correction=False, workers=where)
            quantize_model(MODEL, out, data, config)
        elif stage == "search":
            config = preset_config(
                "default", target_sqnr=60.0, max_samples=SEARCH_SAMPLES, workers=where
            )
            quantize_model(MODEL, out, data, config)
        else:
            # every layer int8 (--prefer int8): --prefer balanced or speed keeps this classifier's
            # convolutions float (faster here), and evaluation would pair 1 layer, not 60
            config = preset_config("default", max_samples=16, prefer="int8")
            quantize_model(MODEL, out, data, config)
            start = time.perf_counter()
            compare_models(MODEL, out, data, latency_runs=0, workers=where)
        seconds = time.perf_counter() - start
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    child = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {"seconds": seconds, "peak_mb": own, "worker_peak_mb": child}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--ray", action="store_true", help="also on Ray (local, --workers CPUs)")
    parser.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES))
    parser.add_argument("--one", nargs=4, help=argparse.SUPPRESS)  # stage data workers ray
    args = parser.parse_args()
    if args.one:
        stage, data, workers, ray = args.one
        print(json.dumps(measure(stage, Path(data), int(workers), ray == "1")))
        return
    with tempfile.TemporaryDirectory() as folder:
        data = Path(folder) / "lines.npy"
        np.save(data, text_lines(args.samples, 192, seed=3)[0])
        print(f"{args.samples} text lines of the PP-OCR classifier; seconds, peak RSS MB")
        print(f"{'stage':<12} {'where':<10} {'seconds':>8} {'driver MB':>10} {'worker MB':>10}")
        runs = [(w, False) for w in args.workers] + [(w, True) for w in args.workers if args.ray]
        for stage in args.stages:
            for workers, ray in runs:
                one = [stage, str(data), str(workers), "1" if ray else "0"]
                done = subprocess.run(
                    [sys.executable, __file__, "--one", *one], capture_output=True, text=True
                )
                if done.returncode:
                    print(f"{stage} failed: {done.stderr.strip().splitlines()[-1:]}")
                    continue
                m = json.loads(done.stdout.strip().splitlines()[-1])
                where = f"{'ray' if ray else 'local'} {workers}"
                print(
                    f"{stage:<12} {where:<10} {m['seconds']:>8.2f} {m['peak_mb']:>10.0f} "
                    f"{m['worker_peak_mb']:>10.0f}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
