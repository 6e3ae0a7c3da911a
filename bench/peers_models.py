"""bench/peers.py's models: each bench/ptq.py task and bench/unseen.py model as a Bench (its FP32
file, its evaluation set and calibration draws kept on disk, how to run and time it, its task
metric), so that every tool's file is run and scored the same way."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

import unseen
from datasets import tasks
from ptq import medians, quality, run_model
from unseen_metrics import task_metric
from unseen_models import MODELS, prepared

SAMPLES = 128  # calibration samples per draw
PRIORITY = [
    "nudenet", "ddddocr", "orientation", "layout", "ppocr_rec", "ppocr_det",
    "efficientnet_lite0", "minilm", "ddddocr_det", "ppocr_cls", "cnn", "mobilenet", "transformer",
]  # fmt: skip


@dataclass(frozen=True)
class Bench:
    """One model, its data on disk, how to run it and its task metric."""

    name: str
    model: Path
    data: Path  # eval.npz (inputs by name, optional "labels") and draw<k>.npz (inputs by name)
    score: Callable[[list[np.ndarray], list[np.ndarray]], float]  # (FP32 outputs, INT8 outputs)
    run: Callable[[Path, dict[str, np.ndarray]], list[np.ndarray]]  # every output over the feed
    latency: Callable[[Path, Path, dict[str, np.ndarray]], tuple[float, float]]  # ms fp32, int8

    def evaluation(self) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
        with np.load(self.data / "eval.npz") as saved:
            feed = {k: saved[k] for k in saved.files if k != "labels"}
            return feed, saved.get("labels")

    def calibration(self, draw: int) -> Path:
        return self.data / f"draw{draw}.npz"


def input_names(model: Path) -> list[str]:
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    return [i.name for i in session.get_inputs()]


def by_name(model: Path, x: np.ndarray | dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return dict(x) if isinstance(x, dict) else {input_names(model)[0]: x}


def ptq_bench(name: str, folder: Path, draws: int) -> Bench:
    """A bench/ptq.py task; its data made once (tasks() builds every task's) and kept on disk."""
    folder.mkdir(parents=True, exist_ok=True)
    wanted = ["eval.npz", *(f"draw{k}.npz" for k in range(draws))]
    if not all((folder / f).exists() for f in wanted):
        task = next(t for t in ptq_tasks(SAMPLES * draws) if t.name == name)
        extra = {} if task.labels is None else {"labels": task.labels}
        np.savez(folder / "eval.npz", **{task.input_name: task.evaluate}, **extra)
        for k in range(draws):
            draw = task.calib[k * SAMPLES :][:SAMPLES]
            np.savez(folder / f"draw{k}.npz", **{task.input_name: draw})
    task = next(t for t in ptq_tasks(0) if t.name == name)
    with np.load(folder / "eval.npz") as saved:
        task = dataclasses.replace(task, labels=saved.get("labels"))

    def score(reference: list[np.ndarray], got: list[np.ndarray]) -> float:
        return quality(task, reference[0], got[0])["metric"]

    def run_all(path: Path, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        (x,) = feed.values()
        return [run_model(path, input_names(path)[0], x)]

    def latency(fp32: Path, int8: Path, feed: dict[str, np.ndarray]) -> tuple[float, float]:
        (x,) = feed.values()
        f, q = medians([fp32, int8], x[: task.latency_batch], runs=40)
        return f, q

    return Bench(name, task.model, folder, score, run_all, latency)


@functools.cache
def ptq_tasks(samples: int) -> list:
    return tasks(samples)


def unseen_bench(name: str, folder: Path, draws: int) -> Bench:
    """A bench/unseen.py model, with its own data, runner, timing feed and metric."""
    model = MODELS[name]
    source = prepared(model)
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / "eval.npz").exists():
        x, labels = model.data(model.evaluate, 2)
        extra = {} if labels is None else {"labels": labels}
        np.savez(folder / "eval.npz", **by_name(source, x), **extra)
    for k in range(draws):  # unseen.py's draws: seed 1, then 3, 4, ... (2 is the evaluation set's)
        if not (folder / f"draw{k}.npz").exists():
            calib, _ = model.data(model.calibrate, 1 if k == 0 else k + 2)
            np.savez(folder / f"draw{k}.npz", **by_name(source, calib))

    def score(reference: list[np.ndarray], got: list[np.ndarray]) -> float:
        return task_metric(model, reference, got, model.evaluate)

    def run_all(path: Path, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        return unseen.run(model, path, feed)

    def latency(fp32: Path, int8: Path, feed: dict[str, np.ndarray]) -> tuple[float, float]:
        f, q = unseen.interleaved([fp32, int8], unseen.timing_feed(model, feed), 40)
        return f, q

    return Bench(name, source, folder, score, run_all, latency)


def bench(name: str, out: Path, draws: int) -> Bench:
    folder = out / "data" / name
    if name in MODELS:
        return unseen_bench(name, folder, draws)
    return ptq_bench(name, folder, draws)


def all_models() -> list[str]:
    names = [t.name for t in ptq_tasks(0)] + list(MODELS)
    return [n for n in PRIORITY if n in names] + [n for n in names if n not in PRIORITY]
