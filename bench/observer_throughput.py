"""Observer update throughput on one 64x256x56x56 float32 batch (a ResNet stage's activations).

Run: python bench/observer_throughput.py [--repeats N]
Prints, per observer and granularity, the median seconds per update and GB/s of float32 input.
No asserts: numbers for the notes, measured on the machine at hand.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from qdq import METHODS, make_observer

SHAPE = (64, 256, 56, 56)


def median_update_seconds(method: str, axis: int | None, batch: np.ndarray, repeats: int) -> float:
    observer = make_observer(method, axis=axis)
    observer.update(batch)  # the first batch allocates; time steady-state updates
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        observer.update(batch)
        times.append(time.perf_counter() - start)
    observer.compute()
    return float(np.median(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    batch = np.random.default_rng(0).laplace(size=SHAPE).astype(np.float32)
    gigabytes = batch.nbytes / 1e9
    print(f"batch {SHAPE} float32, {gigabytes:.2f} GB, median of {args.repeats} updates")
    print(f"{'method':<12}{'granularity':<16}{'s/update':>10}{'GB/s':>8}{'compute s':>11}")
    for method in METHODS:
        for axis, label in ((None, "per-tensor"), (1, "per-channel(1)")):
            seconds = median_update_seconds(method, axis, batch, args.repeats)
            observer = make_observer(method, axis=axis)
            observer.update(batch)
            start = time.perf_counter()
            observer.compute()
            compute = time.perf_counter() - start
            rate = gigabytes / seconds
            print(f"{method:<12}{label:<16}{seconds:>10.3f}{rate:>8.2f}{compute:>11.3f}")


if __name__ == "__main__":
    main()
