"""Racing the frontier's timing: a candidate that can no longer be chosen stops being timed,
and the choice on the times taken is the one full timing makes."""

from __future__ import annotations

import numpy as np
import pytest

from qdq.config import Prefer
from qdq.onnx import sessions
from qdq.plan.build import Candidate
from qdq.plan.frontier import pick
from qdq.plan.racing import still_open

from conftest import DIGITS

# The frontier module's example, untimed: (name, dB, ms, int8 nodes).
UNTIMED = [
    Candidate("all int8", 26.0, 0.0, 30),
    Candidate("ends float", 29.0, 0.0, 28),
    Candidate("MatMul only", 35.0, 0.0, 2),
]
MEDIANS = (6.0, 6.4, 12.0)  # ms a run; FP32's 13.0 after them


def _times(rounds: int, spread: float) -> list[list[float]]:
    """Each candidate's and FP32's runs: its median, spread evenly by +-2 * spread (a share)."""
    steps = np.linspace(1 - 2 * spread, 1 + 2 * spread, rounds)
    return [list(ms * steps) for ms in (*MEDIANS, 13.0)]


@pytest.mark.parametrize(
    ("prefer", "chosen"),
    [(Prefer.BALANCED, "ends float"), (Prefer.ACCURACY, "MatMul only"), (Prefer.SPEED, "all int8")],
)
def test_quiet_times_settle_the_choice_in_the_first_rounds(prefer, chosen):
    still = still_open(UNTIMED, lambda trial: pick(trial, prefer))
    times = _times(5, 0.01)
    assert still(times) == set()  # one candidate left: timing stops, FP32's too
    taken = [
        Candidate(c.name, c.score, float(np.median(t)), c.int8_nodes)
        for c, t in zip(UNTIMED, times, strict=False)  # FP32's times last
    ]
    assert pick(taken, prefer).name == chosen


def test_a_candidate_the_noise_could_still_make_the_choice_stays_timed():
    # Balanced: all int8 against ends float is 26 dB against 29 dB less 30 dB per 100% slower,
    # past the 5% tie. With runs spread by +-14%, all int8 at its lower quartile against ends
    # float at its upper quartile wins, so both stay; MatMul only (35 dB at twice the time) is
    # out for good.
    still = still_open(UNTIMED, lambda trial: pick(trial, Prefer.BALANCED))
    assert still(_times(5, 0.07)) == {0, 1}
    assert still(_times(6, 0.01)) == set()  # settled: and MatMul only did not come back


def test_timing_runs_only_the_models_still_named(monkeypatch):
    """After LEAST_ROUNDS, a model `still` leaves out runs no more, and timing stops when it
    names none."""
    real, runs = sessions.open_session, []

    class Counted:
        def __init__(self, session: object, name: str) -> None:
            self.session, self.name = session, name

        def run(self, *args: object) -> list:
            runs.append(self.name)
            return self.session.run(*args)

    monkeypatch.setattr(sessions, "open_session", lambda m, use: Counted(real(m, use), m))
    models = [str(DIGITS / "cnn.onnx"), str(DIGITS / "mobilenet.onnx")]
    feed = {"input": np.load(DIGITS / "calib.npz")["input"][:1]}
    asked: list[int] = []

    def still(times: list[list[float]]) -> set[int]:
        asked.append(len(times[0]))
        return {0} if len(asked) < 3 else set()

    times = sessions.median_latency_ms(models, feed, runs=20, still=still)
    least = sessions.LEAST_ROUNDS
    assert asked == [least, least + 1, least + 2]
    assert runs.count(models[0]) == 1 + least + 2  # a warm-up, the least, two more
    assert runs.count(models[1]) == 1 + least
    assert all(t > 0 for t in times)
