"""Score quantized files of the benchmarks' models on an evaluation set of any size.

Run: python bench/score_files.py --model ppocr_rec [--count 2048] [--seed 5] FILE [FILE ...]
Needs the `bench` extra (and `unseen` for bench/unseen.py's models). Models: bench/qat_finetune.py's
three, and every model of bench/unseen.py, scored by its task metric (unseen_metrics.task_metric:
CenterFace's faces, a detector's firing scores, ...) on a set 4x the bench's own (seed 12: its
calibration draws and evaluation set take 1-4; CenterFace, 256 scenes: docs/ptq.md, stop 58).
Prints one JSON row per file: the task metric against the FP32 model
(bench/ptq.py's: lines decoded as FP32 decodes them, and `text` with spaces at a line's ends
aside; text-mask IoU; top-1 agreement), the output SQNR, the set's size and seed; for a
classifier also `shuffled`: the top-1 agreement its logit error would give spread over the
classes at random (each sample's error permuted across its classes, SHUFFLES times: the same
error power), and `margin_error`: the error of the difference between FP32's two top logits,
which decides the class, over what the shuffled error puts there (its standard deviation; 1
for an error that does not favour the top classes). No asserts: numbers for docs/finetune.md.

Why: a file's share of bench/ptq.py's 128 lines or 256 crops has a standard error of 2-4
points, more than the recipes differ (docs/finetune.md, stop 54), so kept files and
checkpoints are compared on larger sets that no run trained on: by default 2048 lines drawn
with seed 5 (the calibration draws use 3, 103, 203 and the 128 evaluation lines 4), 1024 crops
and 128 pages with bench/ptq.py's seeds (its 256 crops and 32 pages are the first of them).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

import unseen
from ptq import quality, run_model
from qat_finetune import MODELS
from unseen_metrics import sqnr_db, task_metric
from unseen_models import MODELS as UNSEEN
from unseen_models import prepared

# Per model: the default size and seed of the evaluation set (see the docstring).
DEFAULTS = {"ppocr_rec": (2048, 5), "ppocr_det": (128, 9), "efficientnet_lite0": (1024, 6)}
SHUFFLES = 20
UNSEEN_SCALE, UNSEEN_SEED = 4, 12  # bench/unseen.py's models: 4x its evaluation set, seed 12


def spread(reference: np.ndarray, output: np.ndarray) -> dict[str, float]:
    """`shuffled` and `margin_error` of a classifier's logits (the docstring)."""
    want = reference.reshape(len(reference), -1).astype(np.float64)
    error = output.reshape(want.shape) - want
    rng, rows = np.random.default_rng(0), np.arange(len(want))
    first, second = np.argsort(want, axis=1)[:, :-3:-1].T
    agree, margins = [], []
    for _ in range(SHUFFLES):
        permuted = rng.permuted(error, axis=1)
        agree.append(np.mean((want + permuted).argmax(1) == first))
        margins.append(np.std(permuted[rows, first] - permuted[rows, second]))
    margin = np.std(error[rows, first] - error[rows, second])
    return {"shuffled": float(np.mean(agree)), "margin_error": float(margin / np.mean(margins))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS) + sorted(UNSEEN), required=True)
    parser.add_argument("--count", type=int, help="samples in the evaluation set")
    parser.add_argument("--seed", type=int, help="the evaluation set's seed")
    parser.add_argument("files", nargs="+", type=Path)
    args = parser.parse_args()
    if args.model in UNSEEN:
        score_unseen(args)
        return
    spec = MODELS[args.model]
    count, seed = DEFAULTS[args.model]
    count, seed = args.count or count, seed if args.seed is None else args.seed
    data = spec.data(count, seed)
    reference = run_model(spec.path(), spec.input, data, batch=16)
    task = argparse.Namespace(metric=spec.metric, labels=None)
    for path in args.files:
        output = run_model(path, spec.input, data, batch=16)
        row = quality(task, reference, output)
        if spec.metric == "top1":
            row.update(spread(reference, output))
        print(json.dumps({"file": str(path), "count": count, "seed": seed, **row}), flush=True)


def score_unseen(args: argparse.Namespace) -> None:
    """A bench/unseen.py model's files on UNSEEN_SCALE x its evaluation set (or --count)."""
    model = UNSEEN[args.model]
    source = prepared(model)
    count = args.count or UNSEEN_SCALE * model.evaluate
    seed = UNSEEN_SEED if args.seed is None else args.seed
    data, _ = model.data(count, seed)
    reference = unseen.run(model, source, data)
    for path in args.files:
        got = unseen.run(model, path, data)
        row = {"metric": task_metric(model, reference, got, count)}
        row["sqnr_db"] = sqnr_db(reference, got)
        print(json.dumps({"file": str(path), "count": count, "seed": seed, **row}), flush=True)


if __name__ == "__main__":
    main()
