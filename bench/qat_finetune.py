"""PTQ against `qdq finetune` on the PP-OCRv4 recognizer and detector and EfficientNet-Lite0.

Run: python bench/qat_finetune.py [--models ppocr_rec efficientnet_lite0 ppocr_det]
     [--samples 256] [--calib-samples N] [--steps 200] [--batch-size 8] [--draws 1] [--first-draw 0]
     [--start balanced|speed|int8] [--evaluate-scale 1] [--patience 4]
     [--held-out N] [--freeze-oscillations F] [--margin-weight W] [--feature-weight W]
     [--class-logits OUTPUT ...] [--checkpoint-by loss|agreement] [--keep] [--reuse-ptq DIR]
     [--out bench/out/qat_finetune]
Needs the `bench` extra. Prints a Markdown table and writes it, with the rows as JSON, under
--out. No asserts: numbers for docs/finetune.md.

Per model and calibration draw: PTQ as `qdq quantize` makes it by default (`--prefer
balanced`, which may keep slow-to-fix layers float), PTQ's fastest plan (`--prefer speed`,
often every layer int8), and `qdq finetune` of one of the two (`--start`, balanced by
default, as finetune's); PTQ calibrates on the first `--calib-samples` of the `--samples` (all
by default) and fine-tuning trains on all of them (the first 128 of 512 photo crops or pages
are the 128 of a 128-sample run; text lines are not, their flips being drawn first); each
scored against FP32 on held-out evaluation data with bench/ptq.py's task metrics (lines
decoded as FP32 decodes them, and as `text` the same with spaces at a line's ends aside;
text-mask IoU; top-1 agreement), output SQNR, INT8 latency
(ONNX Runtime, 1 thread, runs interleaved, median) and the time each took on this machine.
`--reuse-ptq DIR` starts from the PTQ files an earlier `--keep --out DIR` run wrote (same
model, draw, plan, `--samples` and `--calib-samples`), so that runs compared in pairs start
alike: the speed plan follows the machine's timings (docs/ptq.md).
torch runs on one thread: on this shared 2-core machine two OpenMP threads ran fake
quantization 20x slower (9.7 vs 195 ms on a (4, 64, 24, 160) tensor), waiting for each other's
core.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from model_files import efficientnet_lite0, rapidocr_model
from photos import photo_crops
from ptq import medians, quality, run_model
from qdq.config import CHECKPOINT_BY, preset_config
from qdq.pipeline import quantize_model
from qdq.qat.finetune import FinetuneOptions, finetune_model
from text_images import text_lines, text_pages


@dataclass(frozen=True)
class Model:
    """A model of this benchmark: its FP32 file, input name and task metric (bench/ptq.py's),
    its data (`data(count, seed)`), the seed of calibration draw 0 (draw d adds 100 d), and
    bench/ptq.py's evaluation set (count, seed)."""

    path: Callable[[], Path]
    input: str
    metric: str
    data: Callable[[int, int], np.ndarray]
    calib_seed: int
    evaluate: tuple[int, int]


MODELS = {
    "ppocr_rec": Model(  # draw 0: the calibration set of bench/ptq.py
        lambda: rapidocr_model("ch_PP-OCRv4_rec_infer.onnx"),
        "x",
        "ctc",
        lambda count, seed: text_lines(count, 320, seed=seed, upright=True)[0],
        3,
        (128, 4),
    ),
    "ppocr_det": Model(
        lambda: rapidocr_model("ch_PP-OCRv4_det_infer.onnx"),
        "x",
        "iou",
        lambda count, seed: text_pages(count, 320, seed=seed),
        8,
        (32, 9),
    ),
    "efficientnet_lite0": Model(
        efficientnet_lite0,
        "input",
        "top1",
        lambda count, seed: photo_crops(count, 224, seed=seed),
        5,
        (256, 6),
    ),
}


class Case:
    """A model, its input name, its task metric, and its data (calibration draw `draw`; the
    evaluation set `scale` times bench/ptq.py's)."""

    def __init__(self, name: str, samples: int, draw: int, scale: int = 1) -> None:
        if name not in MODELS:
            raise SystemExit(f"unknown model {name}")
        spec = MODELS[name]
        self.name, self.model, self.input, self.metric = name, spec.path(), spec.input, spec.metric
        self.calib = spec.data(samples, spec.calib_seed + 100 * draw)
        count, seed = spec.evaluate
        self.evaluate = spec.data(count * scale, seed)


def run_case(case: Case, draw: int, args: argparse.Namespace, folder: Path) -> list[dict]:
    data = folder / f"{case.name}_{draw}.npz"
    np.savez(data, **{case.input: case.calib})
    reference = run_model(case.model, case.input, case.evaluate, batch=16)
    rows, paths = [], []
    labels = {
        "balanced": "PTQ (default)",
        "speed": "PTQ (--prefer speed)",
        "int8": "PTQ (--prefer int8)",
    }
    for prefer in args.ptq:
        label = labels[prefer]
        path = folder / f"{case.name}_{draw}_{prefer}.onnx"
        kept = args.reuse_ptq / path.name if args.reuse_ptq else None
        start = time.perf_counter()
        if kept is not None and kept.exists():  # an earlier run's file: pairs start alike
            shutil.copyfile(kept, path)
            label += f" (reused from {kept})"
        else:
            config = preset_config("default", prefer=prefer, max_samples=args.calib_samples)
            quantize_model(case.model, path, data, config)
        seconds, samples = time.perf_counter() - start, args.calib_samples or len(case.calib)
        rows.append({"method": label, "seconds": seconds, "samples": samples})
        paths.append(path)
    path = folder / f"{case.name}_{draw}_finetune.onnx"
    options = FinetuneOptions(
        steps=args.steps,
        lr=args.lr,
        batch_size=args.batch_size,
        patience=args.patience,
        held_out=args.held_out,
        freeze_oscillations=args.freeze_oscillations,
        margin_weight=args.margin_weight,
        feature_weight=args.feature_weight,
        class_logits=tuple(args.class_logits),
        checkpoint_by=args.checkpoint_by,
        threads=1,
    )
    start = time.perf_counter()
    start_plan = paths[args.ptq.index(args.start)]  # the very file fine-tuning starts from
    config = preset_config("default", prefer=args.start)
    report = finetune_model(case.model, path, data, config, options, seed=draw, start=start_plan)
    rows.append(
        {
            "method": f"finetune of {labels[args.start]} ({report.steps} steps, kept "
            f"{report.best_step})",
            "seconds": time.perf_counter() - start,
            "held_out_sqnr": [report.sqnr_before, report.sqnr_after],
            "held_out_agreement": report.agreement,
            "samples": len(case.calib),
        }
    )
    paths.append(path)
    latency = medians(paths, case.evaluate[:1], args.latency_runs)
    for row, path, ms in zip(rows, paths, latency, strict=True):
        task = argparse.Namespace(metric=case.metric, labels=None)
        output = run_model(path, case.input, case.evaluate, batch=16)
        row.update(quality(task, reference, output), model=case.name, draw=draw, latency_ms=ms)
        # also on the first samples: bench/ptq.py's own evaluation set for photo crops and
        # pages (text lines draw their flips first, so their first lines differ from its)
        if args.evaluate_scale > 1:
            base = len(case.evaluate) // args.evaluate_scale
            row["metric_base"] = quality(task, reference[:base], output[:base])["metric"]
        print(json.dumps(row), flush=True)
    return rows


def markdown(rows: list[dict]) -> str:
    lines = [
        "| model | draw | method | task metric | output SQNR (dB) | INT8 ms | time (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        text = f" (text {r['text']:.3f})" if "text" in r else ""  # edge spaces aside
        lines.append(
            f"| {r['model']} | {r['draw']} | {r['method']} | {r['metric']:.3f}{text} | "
            f"{r['sqnr_db']:.2f} | {r['latency_ms']:.2f} | {r['seconds']:.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--models", nargs="+", default=["ppocr_rec", "efficientnet_lite0", "ppocr_det"]
    )
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument(
        "--calib-samples", type=int, default=None, help="PTQ's share of --samples (the first)"
    )
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--draws", type=int, default=1)
    parser.add_argument("--first-draw", type=int, default=0, help="the draws run from this one")
    parser.add_argument(
        "--ptq",
        nargs="+",
        choices=["balanced", "speed", "int8"],
        default=["balanced", "speed"],
        help="PTQ rows: quantize's default plan, its fastest, every layer int8",
    )
    parser.add_argument(
        "--start",
        choices=["balanced", "speed", "int8"],
        default="balanced",
        help="the PTQ row fine-tuning starts from (always run)",
    )
    parser.add_argument(
        "--evaluate-scale",
        type=int,
        default=1,
        help="evaluate on this many times bench/ptq.py's evaluation samples (less noise)",
    )
    parser.add_argument("--patience", type=int, default=FinetuneOptions.patience)
    parser.add_argument(
        "--held-out", type=int, help="samples that pick the checkpoint (default: an eighth, 8-64)"
    )
    parser.add_argument(
        "--freeze-oscillations",
        type=float,
        help="freeze weights whose code flips back more often than this share of steps",
    )
    parser.add_argument(
        "--margin-weight",
        type=float,
        default=FinetuneOptions.margin_weight,
        help="weight of the top-class margin term (Softmax outputs and --class-logits)",
    )
    parser.add_argument(
        "--feature-weight",
        type=float,
        default=FinetuneOptions.feature_weight,
        help="weight of the inner tensors' error (each quantized activation's float input)",
    )
    parser.add_argument(
        "--class-logits",
        nargs="+",
        default=(),
        metavar="OUTPUT",
        help="outputs holding class logits (EfficientNet-Lite0's `logits`): the margin term "
        "applies to them too",
    )
    parser.add_argument(
        "--checkpoint-by",
        choices=CHECKPOINT_BY,
        default=FinetuneOptions.checkpoint_by,
        help="what picks the checkpoint: the held-out loss, or the share of held-out samples "
        "ranked as FP32 at every position of every class output",
    )
    parser.add_argument("--latency-runs", type=int, default=30)
    parser.add_argument("--keep", action="store_true", help="keep the data and models in --out")
    parser.add_argument(
        "--reuse-ptq",
        type=Path,
        help="a --keep run's --out: its PTQ files (same model, draw and plan) are used instead "
        "of quantizing again, so that runs compared in pairs start from the same file",
    )
    parser.add_argument("--out", type=Path, default=Path("bench/out/qat_finetune"))
    args = parser.parse_args()
    args.ptq = list(dict.fromkeys([*args.ptq, args.start]))
    logging.basicConfig(format="%(asctime)s %(message)s")
    logging.getLogger("qdq.qat.finetune").setLevel(logging.INFO)  # held-out loss as it trains
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            for draw in range(args.first_draw, args.first_draw + args.draws):
                case = Case(name, args.samples, draw, args.evaluate_scale)
                rows += run_case(case, draw, args, args.out if args.keep else Path(tmp))
    table = markdown(rows)
    print(table)
    (args.out / "results.md").write_text(table + "\n")
    (args.out / "results.json").write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
