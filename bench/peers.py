"""qdq's default against ORT's quantize_static and four peer quantizers, run as users run them.

Run: python bench/peers.py [--models nudenet ddddocr ...] [--tools qdq ort quark aimet inc modelopt]
                           [--draws 3] [--out bench/out/peers] [--peers /work/peers] [--all-draws]
Needs the `bench` and `unseen` extras, and the peers' virtual environments made by
`../shared/peers/install.sh /work/peers` (one per tool; their pins conflict with qdq's).

Models: every task of bench/ptq.py (digits, PP-OCR, EfficientNet-Lite0, MiniLM) and every model of
bench/unseen.py, each scored by its own task metric (ptq.quality, unseen.task_metric). Tools, each
run as a command in a fresh process, exactly as a user would:
- qdq: `qdq quantize FP32.onnx -o OUT.onnx --calib CALIB.npz`, nothing else;
- ort: ONNX Runtime's quantize_static as its docs and issues recommend: opset upgraded to 13 where
  older, quant_pre_process, QDQ, uint8 activations, int8 weights per channel, MinMax / Percentile /
  Entropy, on every op type it quantizes or restricted (op_types_to_quantize) to Conv+MatMul (models
  with convolutions) or to MatMul (transformers);
- quark, aimet, inc, modelopt: `/work/peers/<tool>/bin/python ../shared/peers/<tool>_quantize.py
  FP32.onnx OUT.onnx CALIB.npz --config NAME`, their default and their accuracy recipes
  (PEER_CONFIGS below; AdaRound, AdaQuant and INC's sq_auto, which train for minutes per layer on
  these CPUs, are left out; SmoothQuant only on models without convolutions, where the wrappers'
  notes say it works).
Calibration: 128 samples per draw; draw k of a bench/ptq.py task is the k-th 128 of its
calibration set, of a bench/unseen.py model the set unseen.py's draw k uses. Every configuration
is calibrated on draw 0; by default draws 1.. run only for qdq and the LEADERS best peer
configurations on draw 0 (--all-draws: every configuration), so the table's mean and worst are
over `--draws` draws for those and the comparison is made between configurations with as many.
INT8/FP32 latency: draw 0's model against FP32, ONNX Runtime, 1 thread, runs interleaved
(ptq.medians; unseen.interleaved). Results are cached per (model, tool, config, draw) in
--out/results/MODEL.json, so a run resumes where it stopped, and several runs share the work (each
model is locked by one); a failing configuration is a row "fails: <reason>" (--retry TEXT runs the
failures whose reason contains TEXT again). Prints and writes --out/peers.md. No asserts: numbers
for docs/peers.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import fcntl
import functools
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

import unseen
from datasets import tasks
from peers_table import markdown
from ptq import medians, quality, quantize_static_qdq, run_model
from unseen import MODELS, ONET_THRESHOLD, locate, sqnr_db, task_metric

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SHARED = ROOT.parent / "shared" / "peers"
SAMPLES = 128  # calibration samples per draw
QUANTIZE_TIMEOUT_S = 600  # a configuration that takes longer is a row "timed out"
PRIORITY = [
    "nudenet", "ddddocr", "orientation", "layout", "ppocr_rec", "ppocr_det",
    "efficientnet_lite0", "minilm", "ddddocr_det", "ppocr_cls", "cnn", "mobilenet", "transformer",
]  # fmt: skip
# per tool: its default first, then its accuracy recipes (../shared/peers/README.md)
PEER_CONFIGS = {
    "quark": ["default", "u8s8_percentile", "a8w8_pc", "sq"],
    "aimet": ["default", "tf_enhanced", "best"],
    "inc": ["default", "percentile", "sq"],
    "modelopt": ["default", "max"],
}
SMOOTHQUANT = {"quark": "sq", "inc": "sq"}  # configs run only on models without Conv
TOOLS = ["qdq", "ort", *PEER_CONFIGS]
ENTROPY_MODELS = {"cnn", "nudenet", "ddddocr"}
FRESH: set[str] = set()  # tools whose cached rows are measured again (--fresh)
LEADERS = 1  # peer configurations calibrated on every draw (--all-draws: all of them)


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
        task = next(t for t in _ptq_tasks(SAMPLES * draws) if t.name == name)
        extra = {} if task.labels is None else {"labels": task.labels}
        np.savez(folder / "eval.npz", **{task.input_name: task.evaluate}, **extra)
        for k in range(draws):
            draw = task.calib[k * SAMPLES :][:SAMPLES]
            np.savez(folder / f"draw{k}.npz", **{task.input_name: draw})
    task = next(t for t in _ptq_tasks(0) if t.name == name)
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
def _ptq_tasks(samples: int) -> list:
    return tasks(samples)


def unseen_bench(name: str, folder: Path, draws: int) -> Bench:
    """A bench/unseen.py model, with its own data, runner, timing feed and metric."""
    model = MODELS[name]
    source = locate(model) if model.prepare is None else model.prepare(locate(model))
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
    names = [t.name for t in _ptq_tasks(0)] + list(MODELS)
    return [n for n in PRIORITY if n in names] + [n for n in names if n not in PRIORITY]


# ---------------------------------------------------------------- configurations


def op_types(model: Path) -> set[str]:
    return {node.op_type for node in onnx.load(str(model), load_external_data=False).graph.node}


def configs(tool: str, name: str, model: Path) -> list[str]:
    ops = op_types(model)
    if tool == "qdq":
        return ["default"]
    if tool == "ort":
        # Conv+MatMul for networks with convolutions, MatMul alone for transformers and for
        # networks with both (a recognizer's attention neck: the restriction users try first).
        restricted = ["conv_matmul"] if "Conv" in ops else []
        restricted += ["matmul"] if "MatMul" in ops or not restricted else []
        methods = ["minmax", "percentile"]
        # Entropy: quantize_static builds its calibrator with 128 bins and 128 quantized bins
        # (extra_options cannot change them), which leaves one candidate threshold, the full
        # range: MinMax's model, after minutes of histograms. On ENTROPY_MODELS only, to show it.
        entropy = ["entropy"] if name in ENTROPY_MODELS else []
        return methods + entropy + [f"{m}_{r}" for r in restricted for m in methods]
    return [c for c in PEER_CONFIGS[tool] if c != SMOOTHQUANT.get(tool) or "Conv" not in ops]


def command(tool: str, config: str, source: Path, out: Path, calib: Path, peers: Path) -> list[str]:
    """The command line a user would type for `tool` with `config`."""
    if tool == "qdq":
        return [
            str(Path(sys.executable).parent / "qdq"),
            "quantize",
            str(source),
            "-o",
            str(out),
            "--calib",
            str(calib),
        ]
    if tool == "ort":
        return [sys.executable, __file__, "--ort", str(source), str(out), str(calib), config]
    batch = [] if ort_fixed_batch(source) else ["--calib-batch", "16"]
    return [
        str(peers / tool / "bin" / "python"),
        str(SHARED / f"{tool}_quantize.py"),
        str(source),
        str(out),
        str(calib),
        "--config",
        config,
        *batch,
    ]


def ort_fixed_batch(source: Path) -> bool:
    session = ort.InferenceSession(str(source), providers=["CPUExecutionProvider"])
    return any(i.shape[0] == 1 for i in session.get_inputs())


def ort_quantize(source: Path, out: Path, calib: Path, config: str) -> None:
    """quantize_static as recommended: opset >= 13, quant_pre_process, QDQ, u8 activations, s8
    per-channel weights; `config` = method[_conv_matmul | _matmul] (op_types_to_quantize)."""
    from onnxruntime.quantization import CalibrationDataReader

    method, _, restricted = config.partition("_")
    only = {"conv_matmul": ["Conv", "MatMul"], "matmul": ["MatMul"], "": None}[restricted]
    step = 1 if ort_fixed_batch(source) else 16
    with np.load(calib) as saved:
        data = {k: saved[k] for k in saved.files}
    count = len(next(iter(data.values())))

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.starts = iter(range(0, count, step))

        def get_next(self) -> dict[str, np.ndarray] | None:
            i = next(self.starts, None)
            return None if i is None else {k: v[i : i + step] for k, v in data.items()}

    with tempfile.TemporaryDirectory() as tmp:
        model = onnx.load(str(source))
        opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
        upgraded = Path(tmp) / "opset13.onnx"
        if opset < 13:
            model = onnx.version_converter.convert_version(model, 13)
        onnx.save(model, str(upgraded))
        quantize_static_qdq(
            upgraded,
            out,
            Reader(),
            {"minmax": "MinMax", "percentile": "Percentile", "entropy": "Entropy"}[method],
            per_channel=True,
            op_types=only,
            # it otherwise keeps every batch's activations until the end: 10+ GB on the layout
            # model; MinMax's ranges are the same either way. Not a divisor of the batch count:
            # when the last flush empties the buffer ORT 1.32 raises "No data is collected"
            extra_options={"CalibMaxIntermediateOutputs": 15},
        )


# ---------------------------------------------------------------- running and caching


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+")
    parser.add_argument("--tools", nargs="+", choices=TOOLS, default=TOOLS)
    parser.add_argument("--draws", type=int, default=3)
    parser.add_argument("--all-draws", action="store_true", help="every config on every draw")
    parser.add_argument("--out", type=Path, default=HERE / "out" / "peers")
    parser.add_argument("--peers", type=Path, default=Path("/work/peers"))
    parser.add_argument("--retry", default="", help="run again cached failures with this text")
    parser.add_argument(
        "--fresh", nargs="+", default=[], help="measure these tools again (qdq after a change)"
    )
    parser.add_argument("--table-only", action="store_true", help="print the cached results")
    parser.add_argument("--ort", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.ort:
        source, out, calib, config = args.ort
        ort_quantize(Path(source), Path(out), Path(calib), config)
        return
    args.out.mkdir(parents=True, exist_ok=True)
    ort.set_default_logger_severity(3)  # ddddocr's shape warnings, one per run
    cache = Cache(args.out / "results")
    FRESH.update(args.fresh)
    names = args.models or all_models()
    unknown = [n for n in names if n not in all_models()]
    if unknown:
        raise SystemExit(f"unknown models {unknown}; known: {all_models()}")
    if not args.table_only:
        for name in names:
            lock = (cache.folder / f"{name}.lock").open("w")
            try:  # two processes on one model would overwrite each other's rows
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                print(f"{name}: another bench/peers.py is on it; next model", flush=True)
                continue
            cache.reload(name)
            try:
                benchmark(
                    name, args.tools, args.draws, args.all_draws, args.peers, cache, args.retry
                )
            except Exception as error:  # a model whose data or FP32 run fails: note it, go on
                print(f"{name}: fails: {str(error).splitlines()[0]}", flush=True)
            finally:
                lock.close()
        cache = Cache(args.out / "results")  # with what other processes wrote meanwhile
    percents = {n: (MODELS[n].metric != "firing" if n in MODELS else True) for n in names}
    table = markdown(cache.rows, names, percents, TOOLS)
    (args.out / "peers.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
