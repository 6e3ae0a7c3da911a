"""What picks `qdq finetune`'s checkpoint (`--checkpoint-by`): the held-out loss, or the share
of held-out samples the file ranks as FP32 does on its class outputs (`HeldOut`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from qdq.cli import main
from qdq.config import preset_config
from qdq.data import Samples, model_inputs
from qdq.errors import DataError
from qdq.onnx.sessions import open_session
from qdq.pipeline import quantize_model
from qdq.qat import finetune_trainer
from qdq.qat.finetune import FinetuneOptions, finetune_model
from qdq.qat.held_out import HeldOut

from conftest import DIGITS

# 2-bit weights: the digits CNN's int8 file ranks some samples otherwise than FP32
CONFIG = preset_config("default", weight_bits=2, sequential_bias_correction=False, prefer="speed")


@pytest.fixture(scope="module")
def ptq(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("checkpoint") / "ptq.onnx"
    quantize_model(DIGITS / "cnn.onnx", path, DIGITS / "calib.npz", CONFIG)
    return path


def _trainer(ptq: Path, options: FinetuneOptions) -> finetune_trainer.Trainer:
    model = onnx.load(DIGITS / "cnn.onnx")
    samples = Samples(DIGITS / "calib.npz", model_inputs(model))
    teacher = open_session(model)
    return finetune_trainer.Trainer(onnx.load(ptq), teacher, samples, CONFIG, options, 64, 0)


def test_held_out_agreement_is_the_files_top1_agreement_with_fp32(ptq: Path) -> None:
    """On a classifier's declared logits, the held-out agreement is the share of held-out
    samples whose top class in ONNX Runtime's run of the file is FP32's; without a class
    output there is none."""
    options = FinetuneOptions(batch_size=16, class_logits=("logits",), checkpoint_by="agreement")
    trainer = _trainer(ptq, options)
    feed = next(trainer.held.batches(64))
    want, got = (s.run(None, feed)[0] for s in (trainer.teacher, open_session(ptq)))
    direct = float(np.mean(want.argmax(1) == got.argmax(1)))
    assert 0.5 < direct < 1  # the test's premise: some, not all, samples ranked otherwise
    assert trainer._held_out().agreement == pytest.approx(direct)
    assert _trainer(ptq, FinetuneOptions(batch_size=16))._held_out().agreement is None


def test_a_sequence_agrees_only_where_every_position_ranks_as_fp32(ptq: Path) -> None:
    """A recognizer's sample is a sequence of class scores: it counts only where the top
    class of every position is FP32's (one position off decodes another text)."""
    trainer = _trainer(ptq, FinetuneOptions(class_logits=("logits",), checkpoint_by="agreement"))
    want = np.zeros((3, 4, 5), np.float32)  # 3 samples, 4 positions, 5 classes
    want[:, :, 1] = 1.0
    got = want.copy()
    got[1, 2, 3] = 2.0  # sample 1, position 2: another top class
    got[2, :, 0] = 0.5  # sample 2: lower scores, the same ranking
    trainer.classes = {"logits": -1}
    assert trainer._agreeing([want], [torch.from_numpy(got)], 3) == 2
    # time-major (positions, samples, classes), as some recognizers write it
    time_major = [np.swapaxes(x, 0, 1) for x in (want, got)]
    assert trainer._agreeing(time_major[:1], [torch.from_numpy(time_major[1])], 3) == 2


@pytest.mark.parametrize(
    ("by", "held_out", "kept"),
    [
        ("loss", 100, 2),  # the lowest loss, though it ranks fewer samples as FP32
        # the most samples ranked as FP32 beyond their noise (a standard error: 3 points of
        # 100, 8 of 16); of shares within it, the lower loss
        ("agreement", 100, 1),
        ("agreement", 16, 2),
    ],
)
def test_the_checkpoint_is_the_best_by_the_chosen_score(
    ptq: Path, monkeypatch: pytest.MonkeyPatch, by: str, held_out: int, kept: int
) -> None:
    options = FinetuneOptions(
        steps=3, evaluate_every=1, batch_size=16, threads=1, class_logits=("logits",),
        margin_weight=1.0, checkpoint_by=by,
    )  # fmt: skip
    trainer = _trainer(ptq, options)
    losses, shares = [0.5, 0.4, 0.3, 0.45], [0.80, 0.90, 0.85, 0.92]
    scores = [HeldOut(loss, share, held_out) for loss, share in zip(losses, shares, strict=True)]
    monkeypatch.setattr(trainer, "_step", lambda: 0.0)
    monkeypatch.setattr(trainer, "_held_out", iter(scores).__next__)
    assert trainer.train(progress=False) == (kept, 3)
    assert trainer.scores == (scores[0], scores[kept])


def test_by_agreement_a_drift_below_ptq_writes_ptqs_file(
    ptq: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each checkpoint's share is within the noise of the last one's, at a lower loss (kept),
    but the last ranks 12 points fewer of 16 samples as FP32 than PTQ's file, beyond the
    noise: the file written is PTQ's, and the summary says so."""
    losses, shares = [0.5, 0.4, 0.3], [0.90, 0.84, 0.78]
    scores = iter([HeldOut(loss, share, 16) for loss, share in zip(losses, shares, strict=True)])
    monkeypatch.setattr(finetune_trainer.Trainer, "_step", lambda self: 0.0)
    monkeypatch.setattr(finetune_trainer.Trainer, "_held_out", lambda self: next(scores))
    options = FinetuneOptions(
        steps=2, evaluate_every=1, batch_size=16, threads=1, class_logits=("logits",),
        checkpoint_by="agreement", held_out=16,
    )  # fmt: skip
    out = tmp_path / "tuned.onnx"
    report = finetune_model(
        DIGITS / "cnn.onnx", out, DIGITS / "calib.npz", CONFIG, options, seed=0, start=ptq
    )
    assert (report.best_step, report.kept_ptq) == (2, True)
    assert "wrote the PTQ model" in report.summary(out)
    assert report.agreement == (0.90, 0.90)


def test_cli_picks_by_agreement_and_reports_it(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "tuned.onnx"
    args = ["finetune", str(DIGITS / "cnn.onnx"), "-o", str(out), "--calib"]
    args += [str(DIGITS / "calib.npz"), "--steps", "2", "--max-samples", "32"]
    assert main([*args, "--class-logits", "logits", "--checkpoint-by", "agreement"]) == 0
    printed = capsys.readouterr().out
    chosen = "(the most held-out samples ranked as FP32 beyond their noise, else the least loss)"
    assert chosen in printed
    assert "ranked as FP32 at every position of every class output, PTQ -> fine-tuned" in printed


def test_cli_refuses_agreement_without_a_class_output(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """Nothing in the digits CNN marks its logits as class scores: the user must say so,
    before any work."""
    out = tmp_path / "tuned.onnx"
    args = ["finetune", str(DIGITS / "cnn.onnx"), "-o", str(out), "--calib"]
    assert main([*args, str(DIGITS / "calib.npz"), "--checkpoint-by", "agreement"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "name its logits in --class-logits" in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("declared", [True, False])
def test_class_logits_without_a_class_axis_are_refused_in_one_line(tmp_path, declared) -> None:
    """`--class-logits` on an output of no class axis (a mean over the batch): refused, before
    any work where the file declares its rank, else on the first batch; it had ended in an
    internal error inside the margin term."""
    model = onnx.load(DIGITS / "cnn.onnx")
    model.graph.node.append(onnx.helper.make_node("ReduceMean", ["logits"], ["mean"], keepdims=0))
    shape = [] if declared else None
    model.graph.output.append(onnx.helper.make_tensor_value_info("mean", 1, shape))
    source = tmp_path / "with_mean.onnx"
    onnx.save(model, source)
    options = FinetuneOptions(steps=2, margin_weight=1.0, class_logits=("mean",), threads=1)
    with pytest.raises(DataError, match=r"`class_logits` names \['mean'\]"):
        finetune_model(source, tmp_path / "out.onnx", DIGITS / "calib.npz", CONFIG, options)
    assert not (tmp_path / "out.onnx").exists()
