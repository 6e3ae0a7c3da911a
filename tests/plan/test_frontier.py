"""--prefer: candidate plans scored by their output error and timed in ONNX Runtime; int8 only
where it pays."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable

import numpy as np
import onnx
import pytest

import models
from models import attention_block
from qdq import ptq
from qdq.config import Prefer, QuantConfig
from qdq.onnx import sessions
from qdq.onnx.graph import GraphIndex
from qdq.pipeline import prepare, quantize_model
from qdq.plan import frontier, timing
from qdq.plan.build import Candidate, Plan
from qdq.plan.decisions import Decision, static_decisions
from qdq.plan.families import Families, activation_matmuls, variants
from qdq.plan.frontier import choose_plan, pick

from conftest import DIGITS, digits_cnn_sqnr

# The module docstring's example: (name, dB, ms, int8 nodes).
FRONTIER = [
    Candidate("all int8", 26.0, 6.0, 30),
    Candidate("ends float", 29.0, 6.4, 28),
    Candidate("MatMul only", 35.0, 12.0, 2),
]


@pytest.mark.parametrize(
    ("prefer", "taken"),
    [
        (Prefer.ACCURACY, "MatMul only"),  # the best score, at twice the time
        (Prefer.BALANCED, "ends float"),  # 3 dB better for 7% slower (2% past the tie)
        (Prefer.SPEED, "all int8"),  # the fastest (6.4 ms is past the 5% tie)
    ],
)
def test_each_preference_takes_its_point_of_the_frontier(prefer, taken):
    assert pick(FRONTIER, prefer).name == taken


def test_above_enough_sqnr_balanced_takes_the_most_int8():
    # 36 / 39 / 45 dB: every candidate is past ENOUGH_DB.
    high = [Candidate(c.name, c.score + 10, c.latency_ms, c.int8_nodes) for c in FRONTIER]
    assert pick(high, Prefer.BALANCED).name == "all int8"
    assert pick(high, Prefer.ACCURACY).name == "MatMul only"  # accuracy still takes the best


def test_equally_fast_candidates_go_to_the_one_with_most_int8():
    # 1.00 vs 1.04 ms is within the 5% timing tie; 0.010 vs 0.025 ms within 20 us.
    tied = [Candidate("a", 20.0, 1.04, 30), Candidate("b", 20.05, 1.00, 10)]
    assert pick(tied, Prefer.SPEED).name == "a"
    tiny = [Candidate("a", 40.0, 0.025, 30), Candidate("b", 45.0, 0.010, 10)]
    assert pick(tiny, Prefer.SPEED).name == "a"
    apart = [Candidate("a", 40.0, 1.20, 30), Candidate("b", 40.0, 1.00, 10)]
    assert pick(apart, Prefer.SPEED).name == "b"  # 20% apart is a real difference


def test_prefer_accuracy_takes_the_best_scoring_candidate(tmp_path):
    out = tmp_path / "q.onnx"
    report = quantize_model(
        DIGITS / "cnn.onnx", out, DIGITS / "calib.npz", QuantConfig(prefer="accuracy")
    )
    chosen = [c for c in report.candidates if c.chosen]
    assert len(report.candidates) >= 3
    assert len(chosen) == 1
    assert chosen[0].score == max(c.score for c in report.candidates)
    assert "candidate plans" in report.summary(out)
    # Keeping the convolutions float scores ~10 dB more on this model (52 vs 42 dB).
    assert chosen[0].name != "all int8"
    assert any("--prefer accuracy chose" in d.reason for d in report.kept_float)
    # The candidates were scored on calibration samples; held-out images agree.
    all_int8 = next(c for c in report.candidates if c.name == "all int8")
    assert digits_cnn_sqnr(out) > all_int8.score - 1


def test_prefer_speed_keeps_a_tiny_model_all_int8(tmp_path, monkeypatch):
    # The digits CNN runs in ~12 us: every candidate is within the 20 us tie, so the one with
    # the most int8 nodes is taken. Timed as equal here: a loaded machine's timing is no test.
    monkeypatch.setattr(frontier, "latencies_ms", lambda models, *_: [0.012] * len(models))
    report = quantize_model(
        DIGITS / "cnn.onnx", tmp_path / "q.onnx", DIGITS / "calib.npz", QuantConfig(prefer="speed")
    )
    assert next(c for c in report.candidates if c.chosen).name == "all int8"
    assert not any("--prefer" in d.reason for d in report.kept_float)


def test_the_budget_replaces_the_frontier(tmp_path):
    report = quantize_model(
        DIGITS / "cnn.onnx",
        tmp_path / "q.onnx",
        DIGITS / "calib.npz",
        QuantConfig(target_sqnr=20.0),
    )
    assert report.candidates == []


def test_balanced_pays_latency_for_a_large_gain():
    # PP-OCRv4's recognizer, measured: its convolutions float gain 27 dB for 20% more time.
    rec = [Candidate("all int8", 8.0, 20.0, 300), Candidate("MatMul only", 35.0, 24.0, 40)]
    assert pick(rec, Prefer.BALANCED).name == "MatMul only"  # 35 - 30 * 0.15 = 30.5 > 8
    small = [Candidate("all int8", 8.0, 20.0, 300), Candidate("MatMul only", 9.0, 24.0, 40)]
    assert pick(small, Prefer.BALANCED).name == "all int8"  # 9 - 4.5 < 8


def test_balanced_buys_a_sequence_model_its_accuracy_but_not_a_slower_than_float_one():
    # Measured frontiers (dB, ms). ddddocr's recognizer: its convolutions float read 98% of the
    # captchas as FP32 does, not 86%, for 37% more time (35 - 30 * 0.32 = 25.5 > 22.6).
    captcha = [Candidate("all int8", 22.6, 6.99, 51), Candidate("MatMul only", 48.05, 9.54, 1)]
    assert pick(captcha, Prefer.BALANCED).name == "MatMul only"
    # Magika: MatMul only would run at 1.9x all int8's time, slower than FP32's 13 ms.
    magika = [Candidate("all int8", 27.69, 7.47, 3), Candidate("MatMul only", 41.33, 14.04, 2)]
    assert pick(magika, Prefer.BALANCED).name == "all int8"


def test_a_model_without_int8_compute_layers_is_not_timed():
    decisions = {
        "add": Decision("add", "Add", True, "int8 flows in"),
        "conv": Decision("conv", "Conv", False, "excluded"),
    }

    def never(_: object) -> float:
        raise AssertionError("scored or timed")

    plan, chosen = choose_plan(decisions, Plan, never, never, {}, Prefer.BALANCED)
    assert chosen == decisions
    assert plan.frontier == ()


def test_the_cli_takes_prefer_and_refuses_an_unknown_choice(tmp_path):
    def qdq(*args: str) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "qdq.cli", "quantize", str(DIGITS / "cnn.onnx")]
        command += ["-o", str(tmp_path / "q.onnx"), "--calib", str(DIGITS / "calib.npz")]
        return subprocess.run([*command, *args], capture_output=True, text=True)

    done = qdq("--prefer", "accuracy")
    assert done.returncode == 0, done.stderr
    assert "(chosen)" in done.stdout
    assert "--prefer accuracy chose the candidate plan 'MatMul only'" in done.stdout
    done = qdq("--prefer", "fastest")
    assert done.returncode == 2
    assert "--prefer" in done.stderr
    done = qdq("--prefer", "speed", "--target-sqnr", "30")
    assert done.returncode == 2
    assert "drop --prefer or --target-sqnr" in done.stderr


def test_prefer_int8_puts_every_op_the_rules_allow_in_int8_untimed(tmp_path, monkeypatch):
    """For the smallest file or an int8-only target: no candidate is timed or chosen."""

    def timed(*_: object) -> list[float]:
        raise AssertionError("timed")

    monkeypatch.setattr(frontier, "latencies_ms", timed)
    out = tmp_path / "q.onnx"
    report = quantize_model(
        DIGITS / "cnn.onnx", out, DIGITS / "calib.npz", QuantConfig(prefer="int8")
    )
    assert report.candidates == []
    assert not any("--prefer" in d.reason for d in report.kept_float)


def test_the_report_times_fp32_with_the_candidates_and_warns_when_int8_is_slower(
    tmp_path, monkeypatch
):
    # The nucleus segmenter measured every plan 1.1-1.5x FP32's time: a user should hear it.
    # Timed as given here (a loaded machine's timing is no test): FP32 last, in the same group
    # as the plans, every plan slower (past the timing tie: a tiny model's microseconds are
    # noise, no warning).
    def timed(fp32: float, plans: float):
        return lambda models, *_: [plans] * (len(models) - 1) + [fp32]

    monkeypatch.setattr(frontier, "latencies_ms", timed(1.0, 2.0))
    report = quantize_model(DIGITS / "cnn.onnx", tmp_path / "q.onnx", DIGITS / "calib.npz")
    assert report.float_ms == 1.0
    summary = report.summary(tmp_path / "q.onnx")
    assert "; FP32 1.000 ms" in summary
    assert "no candidate plan runs faster than FP32 here" in summary
    monkeypatch.setattr(frontier, "latencies_ms", timed(1.0, 0.5))
    faster = quantize_model(DIGITS / "cnn.onnx", tmp_path / "q.onnx", DIGITS / "calib.npz")
    assert "no candidate plan runs faster" not in faster.summary(tmp_path / "q.onnx")
    monkeypatch.setattr(frontier, "latencies_ms", timed(1.0, 1.03))
    tied = quantize_model(DIGITS / "cnn.onnx", tmp_path / "q.onnx", DIGITS / "calib.npz")
    assert "no candidate plan runs faster" not in tied.summary(tmp_path / "q.onnx")  # 3%: a tie


def test_a_timing_budget_cuts_the_rounds_to_the_least(monkeypatch):
    """A model that takes seconds a run is timed in LEAST_ROUNDS interleaved rounds once the
    budget is spent (here at once); without a budget every round runs."""
    real, runs = sessions.open_session, []

    class Counted:
        def __init__(self, session: object) -> None:
            self.session = session

        def run(self, *args: object) -> list:
            runs.append(1)
            return self.session.run(*args)

    monkeypatch.setattr(sessions, "open_session", lambda m, use: Counted(real(m, use)))
    models = [str(DIGITS / "cnn.onnx"), str(DIGITS / "mobilenet.onnx")]
    feed = {"input": np.load(DIGITS / "calib.npz")["input"][:1]}
    times = sessions.median_latency_ms(models, feed, runs=20, budget_s=0.0)
    assert len(runs) == 2 * (1 + sessions.LEAST_ROUNDS)  # a warm-up each, then the least
    assert all(t > 0 for t in times)
    runs.clear()
    sessions.median_latency_ms(models, feed, runs=20)
    assert len(runs) == 2 * 21


def test_a_candidates_score_is_its_lower_quartile_not_its_hardest_sample():
    # PP-OCRv5's recognizer: one hard line of 16 set the pooled SQNR of the plan with its
    # convolutions float, and balanced took a plan that read 5% fewer lines as FP32 does.
    lines = np.array([11.4, 32.5, 33.8, 34.7, 39.2, 41.2, 41.5, 42.6] + [45.0] * 8)
    score = frontier.quartile_score(lambda model: lines)(onnx.ModelProto())
    assert score == 34.7  # a sample's own value: 4 of the 16 score lower or equal
    # an exact output (inf dB) stays inf; one broken sample (NaN or Inf output) is not outvoted
    assert frontier.quartile_score(lambda m: np.full(4, np.inf))(onnx.ModelProto()) == np.inf
    for broken in (np.nan, -np.inf):
        values = np.array([broken] + [40.0] * 15)
        assert frontier.quartile_score(lambda m, v=values: v)(onnx.ModelProto()) == -np.inf


def test_the_candidates_are_scored_at_the_quartile_of_their_samples(tmp_path, monkeypatch):
    seen: list[np.ndarray] = []  # every per-sample score array the pipeline asked for
    sample_scores = ptq.sample_scores

    def recording(reference, *args):
        score = sample_scores(reference, *args)

        def record(model: onnx.ModelProto) -> np.ndarray:
            seen.append(score(model))
            return seen[-1]

        return record

    monkeypatch.setattr(ptq, "sample_scores", recording)  # the method choice's
    monkeypatch.setattr(frontier, "sample_scores", recording)  # the candidates'
    report = quantize_model(DIGITS / "cnn.onnx", tmp_path / "q.onnx", DIGITS / "calib.npz")
    frontier_scores = seen[-len(report.candidates) :]  # the method choice scored first
    assert len(report.candidates) >= 3
    for candidate, values in zip(report.candidates, frontier_scores, strict=True):
        assert len(values) == 16  # the frontier's samples, one score each
        assert candidate.score == np.quantile(values, 0.25, method="lower")
        assert candidate.score != pytest.approx(values.min())  # not set by the hardest one
    assert "lower quartile of the samples" in report.summary(tmp_path / "q.onnx")


def test_a_transformer_gets_candidates_with_its_attention_float(tmp_path):
    model = attention_block()
    prepared, _, _ = prepare(model, per_channel=True)
    attention = activation_matmuls(prepared)
    # q k^T and the Softmax's weighted sum of the values; not the six layers with a weight
    assert attention == {"MatMul_8", "MatMul_10"}
    decisions = static_decisions(GraphIndex(prepared), QuantConfig())
    found = variants(decisions, Families(attention=attention))
    assert found["attention float"] == attention
    assert found["linear layers only"] == attention  # no convolution to keep float with them
    # and quantize_model offers it: measured (scored and timed) with the other candidates
    source, calib = tmp_path / "m.onnx", tmp_path / "c.npy"
    source.write_bytes(model.SerializeToString())
    np.save(calib, np.random.default_rng(0).standard_normal((32, 8, 16)).astype(np.float32))
    report = quantize_model(source, tmp_path / "q.onnx", calib, QuantConfig())
    names = [c.name for c in report.candidates]
    # without convolutions, "linear layers only" plans the same int8 nodes and is dropped
    assert "attention float" in names
    assert "linear layers only" not in names


def _timed_runs(fed: list[dict]) -> Callable:
    """Times as given, recording the feed: all int8 (the first candidate) 1 ms a run, every
    other plan 2 ms, FP32 (last) 3 ms."""

    def timed(models: list, feed: dict[str, np.ndarray], *_: object) -> list[float]:
        fed.append({name: value.shape for name, value in feed.items()})
        return [1.0] + [2.0] * (len(models) - 2) + [3.0]

    return timed


def test_a_sequence_model_is_timed_on_a_run_of_its_steps_and_reported_per_step(
    tmp_path, monkeypatch
):
    # Silero VAD's frames, timed one a call, ran all int8 at 0.73x FP32's time and with its
    # STFT convolution float at 0.85x, so balanced kept it float; 125 frames in one call (a 4 s
    # clip, as the sequence model is used) ran them at 0.24x and 0.57x.
    fed: list[dict] = []
    monkeypatch.setattr(frontier, "latencies_ms", _timed_runs(fed))
    rng = np.random.default_rng(0)
    frames = rng.standard_normal((200, 60)).astype(np.float32)
    state = rng.standard_normal((200, 16)).astype(np.float32)
    np.savez(tmp_path / "calib.npz", frames=frames, state=state)
    onnx.save(models.frame_net(), tmp_path / "frames.onnx")
    report = quantize_model(tmp_path / "frames.onnx", tmp_path / "q.onnx", tmp_path / "calib.npz")
    assert fed == [{"frames": (timing.TIMING_STEPS, 60), "state": (1, 16)}]
    times = {c.name: c.latency_ms for c in report.candidates}
    assert times["all int8"] == pytest.approx(1.0 / timing.TIMING_STEPS)  # per frame
    assert report.float_ms == pytest.approx(3.0 / timing.TIMING_STEPS)
    # Chosen on whole runs: 1 against 2 ms is past the ties (per frame, 8 against 16 us is not).
    assert next(c for c in report.candidates if c.chosen).name == "all int8"
    masked = models.frame_net(mask=True)  # refuses a run of frames with one sample's mask
    onnx.save(masked, tmp_path / "masked.onnx")
    mask = np.ones((200, 1), np.float32)
    np.savez(tmp_path / "masked.npz", frames=frames, state=state, mask=mask)
    fed.clear()
    quantize_model(tmp_path / "masked.onnx", tmp_path / "q.onnx", tmp_path / "masked.npz")
    assert fed == [{"frames": (1, 60), "state": (1, 16), "mask": (1, 1)}]
