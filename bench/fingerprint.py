"""Fingerprints of qdq's quantized files: did a refactor change any output?

Run: python bench/fingerprint.py [--out bench/out/fingerprints.json] [--models cnn ...]
Quantizes every model of bench/ptq.py and bench/unseen.py through the `qdq quantize` command
(its flags are the stable surface) with the default settings and a few other paths (presets,
methods, data-free, equalization, the accuracy budget, QOperator output) on 64 calibration
samples saved once under --data, and writes the SHA-256 of each output file. Compare two runs
with `diff`; a model missing from an environment is skipped with a note. No asserts.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from datasets import tasks
from unseen_models import MODELS, locate

SAMPLES = 64
CLI = "import sys; from qdq.cli import main; sys.exit(main(sys.argv[1:]))"
# (name, flags): the default, and the paths a refactor of the planner and passes could change.
VARIANTS = [
    ("default", []),
    ("tensorrt_auto", ["--preset", "tensorrt", "--method", "auto"]),
    ("minmax_per_tensor", ["--method", "minmax", "--per-tensor"]),
]
DIGITS_VARIANTS = [
    ("kl_equalize", ["--method", "kl", "--equalize"]),
    ("target_sqnr", ["--target-sqnr", "40"]),
    ("qoperator", ["--format", "qoperator"]),
    ("int8_act_4bit", ["--activation-dtype", "int8", "--weight-bits", "4"]),
]
DATA_FREE = ("mobilenet_bn", ["--data-free", "--input-range", "0", "1"])


def models(data: Path) -> dict[str, tuple[Path, Path]]:
    """Model name -> (model file, its calibration .npy), saving the data on first use."""
    found: dict[str, tuple[Path, Path]] = {}
    data.mkdir(parents=True, exist_ok=True)
    for task in tasks(SAMPLES):
        found[task.name] = (Path(task.model), _saved(data / f"{task.name}.npy", task.calib))
    for name, model in MODELS.items():
        try:
            path = locate(model)
        except SystemExit as missing:
            print(f"skipped {name}: {missing}", file=sys.stderr)
            continue
        file = data / f"{name}.npy"
        found[name] = (path, file if file.exists() else _saved(file, model.data(SAMPLES, 1)[0]))
    return found


def _saved(file: Path, x: np.ndarray) -> Path:
    if not file.exists():
        np.save(file, x)
    return file


def fingerprint(model: Path, calib: Path | None, flags: list[str], out: Path) -> str:
    command = [sys.executable, "-c", CLI, "quantize", str(model), "-o", str(out)]
    command += ["--calib", str(calib)] if calib else []
    done = subprocess.run([*command, *flags], capture_output=True, text=True)
    if done.returncode:
        return "fails: " + (done.stderr.strip().splitlines() or ["?"])[-1][:120]
    return hashlib.sha256(out.read_bytes()).hexdigest()


def main() -> None:
    here = Path(__file__).parent
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=here / "out" / "fingerprints.json")
    parser.add_argument("--data", type=Path, default=here / "out" / "fingerprint-data")
    parser.add_argument("--models", nargs="*")
    args = parser.parse_args()
    found = models(args.data)
    digits = ("cnn", "mobilenet", "transformer")
    result: dict[str, str] = {}
    work = args.out.parent / "fingerprint-models"
    work.mkdir(parents=True, exist_ok=True)
    for name, (model, calib) in found.items():
        if args.models and name not in args.models:
            continue
        variants = VARIANTS + (DIGITS_VARIANTS if name in digits else [])
        for variant, flags in variants:
            key = f"{name}/{variant}"
            result[key] = fingerprint(model, calib, flags, work / f"{name}-{variant}.onnx")
            print(key, result[key], flush=True)
    bn, flags = DATA_FREE
    if not args.models or bn in args.models:
        source = here.parent / "examples" / "digits" / f"{bn}.onnx"
        result[f"{bn}/data_free"] = fingerprint(source, None, flags, work / f"{bn}-df.onnx")
    args.out.write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
