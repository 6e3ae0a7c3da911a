"""An accuracy budget: keep the most harmful layers in float until the output SQNR against FP32
(of the worst output part, `qdq.plan.parts`) reaches a target (`qdq quantize --target-sqnr
DB`), or until a user's own metric does (the `metric` argument of `quantize_model`).

Sensitivity of a layer = how much the output SQNR rises when that layer alone stays float.
Layers are then returned to float most sensitive first, re-measuring the whole model after each,
until the target is met: fewest layers for the budget, as users otherwise do by hand.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import replace

import numpy as np
import onnx

from qdq.onnx.sessions import median_latency_ms, open_session
from qdq.plan.build import BudgetResult, Plan
from qdq.plan.decisions import Decision, kept_float
from qdq.plan.part_stats import judged, worst_sqnr
from qdq.plan.parts import output_parts
from qdq.plan.reference import Reference
from qdq.plan.rules import RULES, Kind
from qdq.plan.suffix import Recorded, record
from qdq.workers import ONE_PROCESS, Pool, Workers, same

# A plan's candidate model: the Q/DQ rewrite, which the caller passes in (plans do not rewrite).
Realize = Callable[[Plan], onnx.ModelProto]

# The plan keeping some layers float, and its score.
Measure = Callable[[list[str]], tuple[Plan, float]]
log = logging.getLogger(__name__)


def sqnr_score(
    reference: Reference, declared: Sequence[str] = (), reuse: bool = False
) -> Callable[[onnx.ModelProto], float]:
    """Scores a candidate by the lowest SQNR in dB of any output part (`qdq.plan.parts`: a
    detector's boxes and scores apart) against FP32's `reference` outputs on its feeds;
    `declared` are `--output-parts` specs. With `reuse`, the first candidate scored (the
    search's all-int8 plan) is recorded, and later ones run only from where they depart from
    it (`qdq.plan.suffix`): the search's hundreds of candidates, not the frontier's few."""
    feeds, names = reference.feeds, reference.names
    parts = output_parts(names, reference.outputs, declared)
    recorded: list[Recorded | None] = []

    def score(candidate: onnx.ModelProto) -> float:
        if not recorded:
            recorded.append(record(candidate, feeds) if reuse else None)
        if recorded[0] is not None:
            outputs = recorded[0].suffix(candidate, names)()
        else:
            session = open_session(candidate)
            outputs = (session.run(names, f) for f in feeds)
        return worst_sqnr(judged(parts, reference.outputs, outputs))

    return score


def meet_target(
    decisions: dict[str, Decision],
    replan: Callable[[dict[str, Decision]], Plan],
    realize: Realize,
    score: Callable[[onnx.ModelProto], float],
    target: float,
    timing_feed: dict[str, np.ndarray],
    workers: Workers = ONE_PROCESS,
    *,
    timed_samples: int = 1,
) -> Plan:
    """The plan with the fewest layers kept float whose `score` (higher is better) reaches
    `target` (or every candidate float, if even that does not), its `budget` filled in;
    `replan` builds a plan from decisions, `realize` its model. The budget carries the latency
    cost of the layers kept float, per sample of `timing_feed` (which holds `timed_samples`).
    Each layer's sensitivity is measured as a task on `workers`."""

    def planned(kept: list[str]) -> Plan:
        return replan(kept_float(decisions, kept, "kept float to meet --target-sqnr"))

    def measure(kept: list[str]) -> tuple[Plan, float]:
        plan = planned(kept)
        return plan, score(realize(plan))

    full, before = measure([])
    if before >= target:
        return replace(full, budget=BudgetResult((), before, before, target))
    candidates = [
        name
        for name, d in full.decisions.items()
        if d.quantized and RULES[d.op_type].kind in (Kind.COMPUTE, Kind.ELEMENTWISE, Kind.SHARED)
    ]
    # Each sensitivity is its own task; then the greedy search scores prefixes, on the same
    # workers (forked once: what each cached for one plan serves the next).
    with workers.pool(same, _score, measure) as pool:
        alone = pool.map([[name] for name in candidates])
        gains = {name: score - before for name, score in zip(candidates, alone, strict=True)}
        order = sorted(candidates, key=lambda name: -gains[name])
        kept, after = _greedy(order, pool, target, workers) if order else ([], before)
    plan = planned(kept) if kept else full
    models = [realize(p) for p in (full, plan)]
    all_int8, budgeted = (
        ms / timed_samples for ms in median_latency_ms(models, timing_feed, runs=20)
    )
    result = BudgetResult(tuple(kept), before, after, target, (all_int8, budgeted))
    return replace(plan, budget=result)


def _greedy(
    order: list[str], pool: Pool, target: float, workers: Workers
) -> tuple[list[str], float]:
    """The shortest prefix of `order` whose score reaches `target` (else all of `order`), and
    its score. In one process, one prefix after another; on parallel workers, the next
    prefixes are scored as tasks in chunks that double from `workers.width`, and the first to
    reach the target wins: the serial result, with some prefixes past it scored for nothing."""
    kept: list[str] = []
    after = float("-inf")
    size = workers.width if workers.parallel else 1
    while len(kept) < len(order):
        ends = range(len(kept) + 1, min(len(kept) + size, len(order)) + 1)
        prefixes = [order[:end] for end in ends]
        for kept, after in zip(prefixes, pool.map(prefixes), strict=True):
            log.info("kept %s float: score %.2f", kept[-1], after)
            if after >= target:
                return kept, after
        size *= 2 if workers.parallel else 1
    return kept, after


def _score(measure: Measure, kept: list[str]) -> float:
    """The score with layers `kept` float (a task on the workers)."""
    return measure(kept)[1]
