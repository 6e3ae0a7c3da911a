"""qdq's default against ORT's quantize_static and four peer quantizers, run as users run them.

Run: python bench/peers.py [--models nudenet ddddocr ...] [--tools qdq ort quark aimet inc modelopt]
                           [--draws 3] [--out bench/out/peers] [--peers /work/peers] [--all-draws]
Needs the `bench` and `unseen` extras, and the peers' virtual environments made by
`../shared/peers/install.sh /work/peers` (one per tool; their pins conflict with qdq's).

Models: every task of bench/ptq.py (digits, PP-OCR, EfficientNet-Lite0, MiniLM) and every model of
bench/unseen.py, each scored by its own task metric (ptq.quality, unseen_metrics.task_metric).
Tools, each run as a command in a fresh process, exactly as a user would:
- qdq: `qdq quantize FP32.onnx -o OUT.onnx --calib CALIB.npz`, nothing else;
- ort: ONNX Runtime's quantize_static as its docs and issues recommend: opset upgraded to 13 where
  older, quant_pre_process, QDQ, uint8 activations, int8 weights per channel, MinMax / Percentile /
  Entropy, on every op type it quantizes or restricted (op_types_to_quantize) to Conv+MatMul (models
  with convolutions) or to MatMul (transformers);
- quark, aimet, inc, modelopt: `/work/peers/<tool>/bin/python ../shared/peers/<tool>_quantize.py
  FP32.onnx OUT.onnx CALIB.npz --config NAME`, their default and their accuracy recipes
  (PEER_CONFIGS in peers_tools.py; AdaRound, AdaQuant and INC's sq_auto, which train for minutes
  per layer on these CPUs, are left out; SmoothQuant only on models without convolutions, where
  the wrappers' notes say it works).
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
This file is the command line; the models and their data are in peers_models.py, the tools'
configurations and commands in peers_tools.py, the runs and the cache in peers_run.py, the tables
in peers_table.py.
"""

from __future__ import annotations

import argparse
import fcntl
from pathlib import Path

import onnxruntime as ort

from peers_models import all_models
from peers_run import FRESH, Cache, benchmark
from peers_table import markdown
from peers_tools import TOOLS, ort_quantize
from unseen_models import MODELS

HERE = Path(__file__).resolve().parent


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
