"""Quantization-aware training on the digits models: FP32, PTQ (`qdq quantize`), QAT with
`qdq.qat` and QAT with torch.ao, per weight grid, each row with the time it took.

Run: python bench/qat.py [--models cnn mobilenet] [--grids int8 int4 ...] [--epochs 15] [--lr 1e-3]
The digits CNN and depthwise model (examples/digits/train.py) are trained in FP32 with train.py's
recipe (60 epochs), exported as train.py exports them, and quantized with `qdq.quantize_model`
on the 256 calibration images train.py bundles (PTQ rows; with an SQNR target every plan meets,
so that every layer takes the grid; the row says how many nodes run int8). QAT rows start from
the same FP32 weights, calibrate on those 256 images, train `--epochs` epochs with labels on the
1,257 fit images (Adam, `--lr` 1e-3, cosine to 0, BatchNorm statistics frozen after half the steps)
and are exported to ONNX; torch.ao's QAT (prepare_qat_fx, x86 qconfig; 4-bit weights as
per-channel FakeQuantize over [-8, 7]) gets the same epochs, schedule and freeze. Every top-1 is
on the 540 held-out images: qdq's files in ONNX Runtime, torch.ao's fake-quant model in eval
mode (and its convert_fx int8 model at 8 bits). Weights per channel (but `int4_per_tensor`),
activations uint8; one torch thread. No asserts.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import math
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from datasets import digits_split
from model_files import DIGITS
from qdq.config import QuantConfig
from qdq.pipeline import quantize_model
from qdq.qat import export, prepare
from qdq.scheme import INT4_WEIGHTS, PerTensor

SPEC = importlib.util.spec_from_file_location("digits_train", DIGITS / "train.py")
TRAIN = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(TRAIN)
GRIDS = {
    "int8": QuantConfig(),
    "int4": QuantConfig(weights=INT4_WEIGHTS),
    "int4_per_tensor": QuantConfig(weights=replace(INT4_WEIGHTS, granularity=PerTensor())),
    "binary": QuantConfig(weight_grid="binary"),
    "ternary": QuantConfig(weight_grid="ternary"),
    "power_of_two": QuantConfig(weight_grid="power_of_two"),
}
TORCH_AO_BITS = {"int8": 8, "int4": 4}  # per channel, as qdq's rows


class Data:
    """The digits split as train.py makes it: fit images and labels, test images and labels."""

    def __init__(self) -> None:
        fit, test, test_labels = digits_split()
        from sklearn.datasets import load_digits

        labels = load_digits().target
        order = np.random.default_rng(0).permutation(len(labels))
        self.fit_x, self.fit_y = torch.from_numpy(fit), torch.from_numpy(labels[order[540:]])
        self.test_x, self.test_y = test, test_labels
        self.calib = self.fit_x[: TRAIN.CALIB_SIZE]


def fit(
    model: nn.Module, data: Data, epochs: int, lr: float, on_step: Callable | None = None
) -> None:
    """train.py's loop: Adam, cosine schedule, batches of 64; `on_step(step, total)` after each."""
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    steps_per_epoch = math.ceil(len(data.fit_x) / 64)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs * steps_per_epoch)
    step = 0
    for _ in range(epochs):
        model.train()
        for batch in torch.randperm(len(data.fit_x)).split(64):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(data.fit_x[batch]), data.fit_y[batch]).backward()
            optimizer.step()
            schedule.step()
            step += 1
            if on_step is not None:
                on_step(step, epochs * steps_per_epoch)
    model.eval()


def onnx_accuracy(path: Path, data: Data) -> float:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    logits = session.run(None, {session.get_inputs()[0].name: data.test_x})[0]
    return float(np.mean(logits.argmax(1) == data.test_y))


def torch_accuracy(model: nn.Module, data: Data) -> float:
    with torch.no_grad():
        logits = model(torch.from_numpy(data.test_x)).numpy()
    return float(np.mean(logits.argmax(1) == data.test_y))


def qdq_qat(
    fp32: nn.Module, config: QuantConfig, data: Data, epochs: int, lr: float, out: Path
) -> float:
    """qdq.qat: prepare (calibrated on the 256 images), train, export; top-1 of the file."""
    torch.manual_seed(0)
    steps = epochs * math.ceil(len(data.fit_x) / 64)
    prepared = prepare(fp32, data.fit_x[:1], config, data.calib.split(64), steps // 2)
    fit(prepared, data, epochs, lr)
    export(prepared, out, data.fit_x[:1])
    return onnx_accuracy(out, data)


def torch_ao_qat(
    fp32: nn.Module, bits: int, data: Data, epochs: int, lr: float
) -> tuple[float, float | None]:
    """torch.ao's QAT with the same recipe; top-1 of the fake-quant model in eval mode and, at
    8 bits, of convert_fx's int8 model."""
    from torch.ao.quantization import (
        FakeQuantize,
        MovingAverageMinMaxObserver,
        MovingAveragePerChannelMinMaxObserver,
        QConfig,
        QConfigMapping,
        disable_observer,
        get_default_qat_qconfig_mapping,
    )
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_qat_fx

    torch.manual_seed(0)
    if bits == 8:
        mapping = get_default_qat_qconfig_mapping("x86")
    else:
        activation = FakeQuantize.with_args(
            observer=MovingAverageMinMaxObserver, quant_min=0, quant_max=255, dtype=torch.quint8
        )
        weight = FakeQuantize.with_args(
            observer=MovingAveragePerChannelMinMaxObserver,
            quant_min=-(2 ** (bits - 1)),
            quant_max=2 ** (bits - 1) - 1,
            dtype=torch.qint8,
            qscheme=torch.per_channel_symmetric,
        )
        mapping = QConfigMapping().set_global(QConfig(activation=activation, weight=weight))
    model = copy.deepcopy(fp32).train()
    prepared = prepare_qat_fx(model, mapping, (data.fit_x[:1],))
    with torch.no_grad():  # calibrate on the same 256 images first
        for batch in data.calib.split(64):
            prepared(batch)

    def freeze(step: int, total: int) -> None:
        if step == total // 2:
            prepared.apply(torch.ao.nn.intrinsic.qat.freeze_bn_stats)
            prepared.apply(disable_observer)

    fit(prepared, data, epochs, lr, freeze)
    fake = torch_accuracy(prepared.eval(), data)
    if bits != 8:
        return fake, None
    return fake, torch_accuracy(convert_fx(prepared), data)


def run_model(
    name: str, grids: list[str], epochs: int, lr: float, data: Data, folder: Path
) -> list:
    rows = []
    torch.manual_seed(0)
    start = time.perf_counter()
    fp32 = getattr(TRAIN, name)()
    fit(fp32, data, 60, 3e-3)
    fp32_seconds = time.perf_counter() - start
    source = folder / f"{name}.onnx"
    TRAIN.export(fp32, data.fit_x[:1], source, torch.onnx.TrainingMode.EVAL)
    base = onnx_accuracy(source, data)
    rows.append((name, "fp32", "FP32 (train 60 epochs)", base, fp32_seconds))
    calib = folder / "calib.npz"
    np.savez(calib, input=data.calib.numpy())
    for grid in grids:
        config = GRIDS[grid]
        out = folder / f"{name}_{grid}_ptq.onnx"
        start = time.perf_counter()
        report = quantize_model(source, out, calib, replace(config, prefer="int8"), seed=0)
        seconds = time.perf_counter() - start
        int8 = sum(d.quantized for d in report.decisions)
        method = f"PTQ (qdq quantize, {int8}/{len(report.decisions)} nodes int8)"
        added = len(rows)
        rows.append((name, grid, method, onnx_accuracy(out, data), seconds))
        start = time.perf_counter()
        top1 = qdq_qat(fp32, config, data, epochs, lr, folder / f"{name}_{grid}_qat.onnx")
        rows.append(
            (name, grid, f"QAT qdq.qat ({epochs} epochs)", top1, time.perf_counter() - start)
        )
        if grid in TORCH_AO_BITS:
            start = time.perf_counter()
            fake, converted = torch_ao_qat(fp32, TORCH_AO_BITS[grid], data, epochs, lr)
            seconds = time.perf_counter() - start
            rows.append((name, grid, f"QAT torch.ao ({epochs} epochs), fake quant", fake, seconds))
            if converted is not None:
                rows.append((name, grid, "  torch.ao convert_fx (int8)", converted, seconds))
        for row in rows[added:]:
            print(_format(row, base), flush=True)
    return rows


def _format(row: tuple, base: float) -> str:
    name, grid, method, top1, seconds = row
    delta = (top1 - base) * 100
    return f"| {name} | {grid} | {method} | {top1:.2%} | {delta:+.2f} | {seconds:.1f} s |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["cnn", "mobilenet"])
    parser.add_argument("--grids", nargs="+", default=list(GRIDS), choices=list(GRIDS))
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--lr", type=float, default=1e-3, help="QAT's peak learning rate")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")  # torch.ao's and the ONNX exporter's deprecation notices
    torch.set_num_threads(1)  # on the busy 2-core machine, 2 threads ran steps 10-20x slower
    data = Data()
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for name in args.models:
            rows += run_model(name, args.grids, args.epochs, args.lr, data, Path(folder))
    print(f"\n{torch.get_num_threads()} torch threads, torch {torch.__version__}")
    print("| model | weights | method | top-1 | vs FP32 (points) | time |")
    print("|---|---|---|---|---|---|")
    bases = {r[0]: r[3] for r in rows if r[1] == "fp32"}
    for row in rows:
        print(_format(row, bases[row[0]]))


if __name__ == "__main__":
    main()
