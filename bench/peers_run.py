"""bench/peers.py's runs: each configuration quantized by its command in a fresh process, scored
against FP32 on the model's evaluation set and cached by (model, tool, config, draw), one JSON
file per model, so that a run resumes where it stopped and several runs share the work."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

from peers_models import Bench, bench
from peers_tools import PEER_CONFIGS, command, configs
from unseen_metrics import ONET_THRESHOLD, sqnr_db
from unseen_models import MODELS

QUANTIZE_TIMEOUT_S = 600  # a configuration that takes longer is a row "timed out"
FRESH: set[str] = set()  # tools whose cached rows are measured again (--fresh)
LEADERS = 1  # peer configurations calibrated on every draw (--all-draws: all of them)


def one_line(stderr: str) -> str:
    lines = [x.strip() for x in stderr.splitlines() if x.strip()]
    errors = [x for x in lines if "Error" in x or "error" in x or "Exception" in x]
    return ((errors or lines or ["no output"])[-1])[:200]


class Cache:
    """Results by (model, tool, config, draw), one JSON file per model in `folder`, so that
    processes working on different models share one cache (each model is locked by one)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.rows: dict[str, dict] = {}
        for path in sorted(folder.glob("*.json")):
            self.rows |= json.loads(path.read_text())

    def reload(self, model: str) -> None:
        path = self.folder / f"{model}.json"
        if path.exists():
            self.rows |= json.loads(path.read_text())

    @staticmethod
    def key(model: str, tool: str, config: str, draw: int | str) -> str:
        return f"{model}|{tool}|{config}|{draw}"

    def get(self, *key: object) -> dict | None:
        return self.rows.get(self.key(*key))

    def put(self, value: dict, model: str, *key: object) -> None:
        self.rows[self.key(model, *key)] = value
        mine = {k: v for k, v in self.rows.items() if k.split("|")[0] == model}
        partial = self.folder / f"{model}.partial"
        partial.write_text(json.dumps(mine, indent=1))
        partial.replace(self.folder / f"{model}.json")


def measure(
    b: Bench, tool: str, config: str, draw: int, peers: Path, cache: Cache, retry: str = ""
) -> dict:
    """Quantize `b` with one configuration on one draw, score it; cached."""
    done = cache.get(b.name, tool, config, draw)
    redo = tool in FRESH or (retry and retry in (done or {}).get("error", ""))
    if done is not None and not redo:
        return done
    if tool in PEER_CONFIGS and not (peers / tool / "bin" / "python").exists():
        return {"error": f"{peers / tool} is not installed"}  # not cached: install, then rerun
    x, _ = b.evaluation()
    reference = _reference(b)
    row: dict[str, object] = {}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "int8.onnx"
        cmd = command(tool, config, b.model, out, b.calibration(draw), peers)
        start = time.perf_counter()
        try:
            child = subprocess.run(
                cmd,
                capture_output=True,
                text=True,
                timeout=QUANTIZE_TIMEOUT_S,
                cwd=tmp,
                env=os.environ | {"PYTHONWARNINGS": "ignore"},
            )
            seconds = time.perf_counter() - start
            if child.returncode < 0:  # no message: the OOM killer, on a loaded machine
                row["error"] = f"killed by signal {-child.returncode}"
            elif child.returncode or not out.exists():
                row["error"] = one_line(child.stderr + child.stdout) or f"exit {child.returncode}"
        except subprocess.TimeoutExpired:
            row["error"] = f"timed out after {QUANTIZE_TIMEOUT_S} s"
        if "error" not in row:
            try:
                got = b.run(out, x)
                if any(g.shape != r.shape for g, r in zip(got, reference, strict=True)):
                    # FP32's values in another shape (Quark's ddddocr: (1, 262720) a sample,
                    # the (1, -1) the file declares, against FP32's (32, 1, 8210)): scored in
                    # FP32's shape, and the table says so
                    got = [g.reshape(r.shape) for g, r in zip(got, reference, strict=True)]
                    row["reshaped"] = True
                row |= {
                    "metric": b.score(reference, got),
                    "sqnr_db": sqnr_db(reference, got),
                    "quantize_s": seconds,
                    "MB": out.stat().st_size / 1e6,
                }
                if draw == 0:
                    fp32_ms, int8_ms = b.latency(b.model, out, x)
                    row |= {"fp32_ms": fp32_ms, "int8_ms": int8_ms}
            except Exception as error:  # ORT's sessions raise their own types
                row["error"] = (str(error).strip().splitlines() or [type(error).__name__])[0][:600]
    row["measured"] = time.strftime("%Y-%m-%d %H:%M")  # qdq's rows: which working tree
    if "No module named" not in row.get("error", ""):  # else an install still under way: retry
        cache.put(row, b.name, tool, config, draw)
    return row


@functools.cache
def _reference_cached(name: str, b: Bench) -> tuple[np.ndarray, ...]:
    return tuple(b.run(b.model, b.evaluation()[0]))


def _reference(b: Bench) -> list[np.ndarray]:
    return list(_reference_cached(b.name, b))


def benchmark(
    name: str, tools: list[str], draws: int, every: bool, peers: Path, cache: Cache, retry: str
) -> None:
    b = bench(name, cache.folder.parent, draws)
    if cache.get(name, "FP32", "", 0) is None:
        _, labels = b.evaluation()
        reference = _reference(b)
        with np.errstate(divide="ignore"):  # ptq.quality's SQNR of FP32 against itself
            fp32 = {"metric": b.score(reference, reference)}
        if labels is not None:
            fp32["labels_accuracy"] = labels_accuracy(name, reference, labels)
        cache.put(fp32, name, "FP32", "", 0)
    plan = [(t, c) for t in tools for c in configs(t, name, b.model)]
    for tool, config in plan:
        log(name, tool, config, 0, measure(b, tool, config, 0, peers, cache, retry))
    for draw in range(1, draws):
        for tool, config in plan if every else leaders(cache, name, plan):
            log(name, tool, config, draw, measure(b, tool, config, draw, peers, cache, retry))


def labels_accuracy(name: str, reference: list[np.ndarray], labels: np.ndarray) -> float:
    """FP32's accuracy on its data's labels: MTCNN's ONet's face decision (as bench/unseen.py
    grades it), else the top class of the first output."""
    if name in MODELS and MODELS[name].metric == "onet":
        return float(((reference[2][:, 1] > ONET_THRESHOLD) == labels).mean())
    return float((reference[0].argmax(-1) == labels).mean())


def leaders(cache: Cache, name: str, plan: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """qdq's default and the LEADERS peer configurations with the best draw-0 metric (then
    SQNR): the ones whose mean over draws decides the comparison."""
    scored = []
    for tool, config in plan:
        row = cache.get(name, tool, config, 0) or {}
        if tool != "qdq" and "metric" in row:
            scored.append((row["metric"], row["sqnr_db"], tool, config))
    best = [(t, c) for *_, t, c in sorted(scored, reverse=True)[:LEADERS]]
    return [("qdq", "default"), *best] if ("qdq", "default") in plan else best


def log(name: str, tool: str, config: str, draw: int, row: dict) -> None:
    shown = row.get("error") or f"metric {row['metric']:.4f} SQNR {row['sqnr_db']:.2f}"
    print(f"{time.strftime('%H:%M:%S')} {name} {tool}/{config} draw {draw}: {shown}", flush=True)
