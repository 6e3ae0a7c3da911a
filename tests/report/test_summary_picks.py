"""`qdq quantize`'s summary names the plans `--prefer accuracy` and `--prefer speed` would take
where they differ from the chosen one: the trade a user may want instead."""

from __future__ import annotations

from dataclasses import replace

from qdq.plan.build import Candidate
from qdq.report.summary import QuantizeReport

# qdq.plan.frontier's docstring example: speed takes all int8, balanced ends float, accuracy
# MatMul only.
FRONTIER = [
    Candidate("all int8", 26.0, 6.0, 30),
    Candidate("ends float", 29.0, 6.4, 28),
    Candidate("MatMul only", 35.0, 12.0, 2),
]


def test_the_summary_names_the_plans_the_other_preferences_would_take():
    # Magika's frontier: balanced took "Conv only"; accuracy would keep 10 dB more at 1.8x the
    # time, and speed's "all int8" is a tie won by file size, not faster: not named.
    magika = [
        Candidate("all int8", 24.07, 3.337, 2),
        Candidate("Conv only", 25.33, 3.184, 1, chosen=True),
        Candidate("MatMul only", 35.95, 5.704, 1),
    ]
    report = QuantizeReport([], 128, 1.0, 100, 50, candidates=magika, float_ms=5.6)
    note = next(n for n in report.summary("q.onnx").splitlines() if n.startswith("note: --prefer"))
    assert (
        note
        == "note: --prefer accuracy takes 'MatMul only' (35.95 dB, 1.79x the chosen plan's time, "
        "1.02x FP32's)"
    )
    chosen = [replace(c, chosen=c.name == "ends float") for c in FRONTIER]
    both = QuantizeReport([], 128, 1.0, 100, 50, candidates=chosen).summary("q.onnx")
    assert "--prefer accuracy takes 'MatMul only' (35.00 dB, 1.88x" in both
    assert "--prefer speed takes 'all int8' (26.00 dB, 0.94x" in both
    accurate = [replace(c, chosen=c.name == "MatMul only") for c in FRONTIER]
    summary = QuantizeReport([], 128, 1.0, 100, 50, candidates=accurate).summary("q.onnx")
    assert "--prefer accuracy takes" not in summary  # it is the chosen one
