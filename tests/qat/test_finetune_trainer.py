"""The training loop of `qdq finetune` (`qdq.qat.finetune_trainer.Trainer`) on small models:
what it trains on and checks against, how each output is distilled, when it stops, what it
logs."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from qdq.config import preset_config
from qdq.data import Samples, model_inputs
from qdq.onnx.sessions import open_session
from qdq.pipeline import quantize_model
from qdq.qat import finetune_trainer
from qdq.qat.finetune import FinetuneOptions
from qdq.qat.finetune_loss import distance
from qdq.qat.held_out import HeldOut

from conftest import DIGITS

# test_finetune's: 4-bit weights, every layer int8, where PTQ is poor (~18 dB)
CONFIG = preset_config("default", weight_bits=4, sequential_bias_correction=False, prefer="speed")
OPTIONS = FinetuneOptions(steps=150, lr=0.01, batch_size=16, evaluate_every=25, threads=1)


@pytest.fixture(scope="module")
def ptq(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The digits CNN's PTQ file at 4-bit weights (test_finetune's start)."""
    path = tmp_path_factory.mktemp("trainer") / "ptq.onnx"
    quantize_model(DIGITS / "cnn.onnx", path, DIGITS / "calib.npz", CONFIG)
    return path


def _samples() -> Samples:
    return Samples(DIGITS / "calib.npz", model_inputs(onnx.load(DIGITS / "cnn.onnx")))


def _trainer(ptq: Path, options: FinetuneOptions = OPTIONS) -> finetune_trainer.Trainer:
    """A trainer of the digits CNN's PTQ file, 16 samples held out."""
    teacher = open_session(onnx.load(DIGITS / "cnn.onnx"))
    return finetune_trainer.Trainer(onnx.load(ptq), teacher, _samples(), CONFIG, options, 16, 0)


def test_patience_counts_only_in_the_second_half_of_the_run(
    ptq: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under a cosine-decayed rate the held-out loss often stalls early and falls late
    (EfficientNet-Lite0's best checkpoints: steps 275-450 of 500), so no stop before half."""
    options = FinetuneOptions(steps=8, evaluate_every=1, patience=1, batch_size=16, threads=1)
    trainer = _trainer(ptq, options)
    monkeypatch.setattr(trainer, "_step", lambda: 0.0)
    monkeypatch.setattr(trainer, "_held_out", lambda: HeldOut(1.0, None, 8))  # never a gain
    assert trainer.train(progress=False) == (0, 4)  # PTQ kept; stopped at the first chance


def test_each_check_logs_the_mean_training_loss_since_the_last(
    ptq: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Beside each held-out loss the log gives the mean loss of the training batches since the
    last check (each taken before its step's update): the two side by side tell a user whether
    more samples (training loss far below) or more steps (the two alike) would help."""
    trainer = _trainer(ptq, FinetuneOptions(steps=4, evaluate_every=2, batch_size=16, threads=1))
    batches: list[float] = []
    real = trainer._loss

    def loss(*args, **kwargs) -> torch.Tensor:
        value = real(*args, **kwargs)
        batches.append(float(value.detach()))
        return value

    monkeypatch.setattr(trainer, "_loss", loss)
    with caplog.at_level(logging.INFO, logger=finetune_trainer.log.name):
        trainer.train(progress=False)
    logged = [float(v) for v in re.findall(r"training loss ([-+.\de]+)", caplog.text)]
    assert len(set(batches)) == len(batches) == 4  # four steps, four different batches
    assert logged == pytest.approx([np.mean(batches[:2]), np.mean(batches[2:])], rel=1e-4)


def test_held_out_loss_is_the_written_files_in_onnx_runtime(ptq: Path) -> None:
    """Checkpoints are chosen on what ONNX Runtime runs: a torch copy gone wrong does not
    change the held-out loss, which equals the distillation loss of the file's outputs."""
    trainer = _trainer(ptq)
    teacher = trainer.teacher
    loss = trainer._held_out().loss
    trainer.graph.forward = lambda feeds, *_: [torch.zeros(len(feeds["input"]), 10)]
    assert trainer._held_out().loss == loss
    feed = next(trainer.held.batches(16))
    want, got = teacher.run(None, feed)[0], open_session(ptq).run(None, feed)[0]
    direct = float(distance(torch.from_numpy(got), torch.from_numpy(want), None))
    assert loss == pytest.approx(direct, rel=1e-5)


def test_training_loss_has_the_files_value_and_the_torch_copys_gradient(
    ptq: Path,
) -> None:
    """A step trains on what ONNX Runtime computes from the file that step would write, with
    gradients through the torch copy (a straight-through estimator at the outputs, and the
    file's codes carried at each quantized activation: tests/qat/test_exact.py)."""
    samples = _samples()
    trainer = _trainer(ptq)
    feed = next(samples.batches(16))
    file = trainer._file_session()
    loss = trainer._loss(feed, file, through=True)
    assert loss.item() == pytest.approx(float(trainer._loss(feed, file)), rel=1e-6)
    trainer.graph.forward = lambda feeds, *_: [
        torch.zeros(len(feeds["input"]), 10).requires_grad_()
    ]
    assert trainer._loss(feed, file, through=True).item() == pytest.approx(loss.item(), rel=1e-6)
    del trainer.graph.forward
    loss.backward()
    grads = [p.grad for p in trainer.graph.parameters() if p.grad is not None]
    assert grads
    assert any(float(g.abs().sum()) > 0 for g in grads)


def test_held_out_and_batches_are_drawn_from_the_whole_set(ptq: Path) -> None:
    """Samples in a meaningful order (a folder of images sorted by class) neither put one
    class in the held-out set nor make a batch of one class: the held-out samples are spread
    over the whole set, and batches visit every training sample once a pass, shuffled."""
    samples = _samples()
    trainer = _trainer(ptq)
    held = trainer.held.order
    assert len(held) == 16
    assert held.max() - held.min() > samples.count // 2
    assert not set(held) & set(trainer.training.order)
    size = OPTIONS.batch_size
    passes = [
        [trainer._next_batch() for _ in range(trainer.training.count // size)] for _ in range(2)
    ]
    for batches in passes:
        seen = np.concatenate(batches)
        assert len(set(seen)) == len(seen) == trainer.training.count // size * size
    assert not np.array_equal(passes[0][0], np.arange(size))  # not in file order
    assert not all(np.array_equal(a, b) for a, b in zip(*passes, strict=True))  # reshuffled


def _trainer_on(
    tmp_path: Path, model: onnx.ModelProto, x: np.ndarray
) -> tuple[ort.InferenceSession, finetune_trainer.Trainer]:
    """The FP32 `model`'s session and a trainer of its PTQ file, both on calibration input
    `x` (8 samples held out)."""
    onnx.save(model, tmp_path / "fp32.onnx")
    np.savez(tmp_path / "calib.npz", x=x)
    quantize_model(tmp_path / "fp32.onnx", tmp_path / "q.onnx", tmp_path / "calib.npz", CONFIG)
    samples = Samples(tmp_path / "calib.npz", model_inputs(model))
    teacher = open_session(model)
    quantized = onnx.load(tmp_path / "q.onnx")
    return teacher, finetune_trainer.Trainer(quantized, teacher, samples, CONFIG, OPTIONS, 8, 0)


def test_a_head_of_boxes_and_scores_is_distilled_per_part(tmp_path: Path) -> None:
    """A YOLO-style output, [boxes in pixels | class scores in [0, 1]] on one axis: the loss is
    the squared error per part, so an error in the scores alone weighs as it would on its own
    (as one tensor the boxes' power would hide it)."""
    h, rng = onnx.helper, np.random.default_rng(0)
    inits = [
        onnx.numpy_helper.from_array(rng.normal(size=(6, 4)).astype(np.float32), "wb"),
        onnx.numpy_helper.from_array(np.float32(100.0), "pixels"),
        onnx.numpy_helper.from_array(rng.normal(size=(6, 5)).astype(np.float32), "ws"),
    ]
    nodes = [
        h.make_node("MatMul", ["x", "wb"], ["b"]),
        h.make_node("Mul", ["b", "pixels"], ["boxes"]),
        h.make_node("MatMul", ["x", "ws"], ["s"]),
        h.make_node("Sigmoid", ["s"], ["scores"]),
        h.make_node("Concat", ["boxes", "scores"], ["y"], axis=1),
    ]
    x_info = h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, (None, 6))
    y_info = h.make_tensor_value_info("y", onnx.TensorProto.FLOAT, (None, 9))
    graph = h.make_graph(nodes, "head", [x_info], [y_info], inits)
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 17)])
    teacher, trainer = _trainer_on(tmp_path, model, rng.normal(size=(64, 6)).astype(np.float32))
    assert trainer.losses["y"] == "mse per part (y[:, 0:4], y[:, 4:9])"
    feed = next(trainer.held.batches(8))
    want = teacher.run(None, feed)[0]
    wrong = want.copy()
    wrong[:, 4:] *= 0.9  # scores 10% low, boxes exact: the scores part's error is 0.01
    trainer.graph.forward = lambda feeds, *_: [torch.from_numpy(wrong)]
    assert float(trainer._loss(feed)) == pytest.approx(0.01, rel=1e-3)


def test_a_dense_heads_value_map_is_distilled_where_its_scores_fire(tmp_path: Path) -> None:
    """A heatmap and a map of offsets on its grid (CenterFace's head): the offsets' error counts
    only at cells where FP32's heatmap passes 0.25, as every score of the plan judges it."""
    h, rng = onnx.helper, np.random.default_rng(0)
    nodes = [
        h.make_node("Sigmoid", ["x"], ["heat"]),
        h.make_node("Conv", ["x", "w"], ["offsets"]),
    ]
    w = onnx.numpy_helper.from_array(np.array([3.0, -2.0], np.float32).reshape(2, 1, 1, 1), "w")
    x_info = h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, (None, 1, 4, 4))
    outputs = [
        h.make_tensor_value_info("heat", onnx.TensorProto.FLOAT, (None, 1, 4, 4)),
        h.make_tensor_value_info("offsets", onnx.TensorProto.FLOAT, (None, 2, 4, 4)),
    ]
    graph = h.make_graph(nodes, "dense", [x_info], outputs, [w])
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 17)])
    x = rng.normal(-5, 0.5, size=(64, 1, 4, 4)).astype(np.float32)  # sigmoid < 0.02
    x[:, 0, 1, 2] = 2.0  # one firing cell per sample: sigmoid(2) = 0.88
    teacher, trainer = _trainer_on(tmp_path, model, x)
    assert trainer.losses["offsets"] == "mse per part (offsets where heat > 0.25)"
    feed = next(trainer.held.batches(8))
    heat, offsets = teacher.run(None, feed)
    background = offsets * 2
    background[:, :, 1, 2] = offsets[:, :, 1, 2]  # wrong everywhere but at the firing cell
    at_cell = offsets.copy()
    at_cell[:, :, 1, 2] *= 0.9  # 10% low where it fires: the error is 0.01 of the signal
    for got, loss in ((background, 0.0), (at_cell, 0.01)):
        trainer.graph.forward = lambda feeds, known=None, inner=(), got=got: [
            torch.from_numpy(heat),
            torch.from_numpy(got),
        ]
        assert float(trainer._loss(feed)) == pytest.approx(loss, rel=1e-3, abs=1e-9)


def test_a_time_major_output_is_judged_per_sample_whatever_its_length(tmp_path: Path) -> None:
    """(T, N, C) scores with T = 8 steps and held-out batches of 8: the time axis had been
    taken for the batch, and the agreement counted steps on which every sample agreed."""
    from onnx import TensorProto, helper, numpy_helper

    from qdq.qat.finetune import finetune_model

    rng = np.random.default_rng(0)
    weights = {"w": (32, 8), "b": (32,), "w2": (48, 32), "b2": (48,)}
    inits = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32) * 0.3, n)
             for n, s in weights.items()]  # fmt: skip
    inits.append(numpy_helper.from_array(np.array([-1, 8, 6], np.int64), "shape"))
    nodes = [
        helper.make_node("Gemm", ["x", "w", "b"], ["g"], transB=1),
        helper.make_node("Relu", ["g"], ["r"]),
        helper.make_node("Gemm", ["r", "w2", "b2"], ["g2"], transB=1),
        helper.make_node("Reshape", ["g2", "shape"], ["s"]),
        helper.make_node("Transpose", ["s"], ["st"], perm=[1, 0, 2]),
        helper.make_node("Softmax", ["st"], ["y"], axis=-1),
    ]
    graph = helper.make_graph(
        nodes, "time_major", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [8, "N", 6])], inits)  # fmt: skip
    source, ptq, calib = tmp_path / "m.onnx", tmp_path / "ptq.onnx", tmp_path / "c.npz"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), source)
    x = rng.standard_normal((128, 8)).astype(np.float32)
    np.savez(calib, x=x)
    config = preset_config("default", weight_bits=3)
    quantize_model(source, ptq, calib, config, seed=1)
    options = FinetuneOptions(steps=4, threads=1, batch_size=8, held_out=32)
    report = finetune_model(source, tmp_path / "o.onnx", calib, config, options, seed=1, start=ptq)
    held = np.sort(np.random.default_rng(1).permutation(len(x))[:32])
    want, got = (ort.InferenceSession(str(p)).run(None, {"x": x[held]})[0] for p in (source, ptq))
    same = (want.argmax(-1) == got.argmax(-1)).all(axis=0)  # every step of each sample
    assert report.agreement[0] == pytest.approx(same.mean())
