"""Timing the frontier's candidates only while the choice could still fall on them.

The frontier times every candidate and FP32 together, interleaved, for up to RUNS rounds
(`qdq.plan.frontier`). Where one candidate is far slower than another at no better score, a few
rounds settle that it cannot be chosen, and its later runs only cost quantize time: on a
wav2vec2 export the two candidates with the transformer's MatMuls float ran 56 ms a round each
and FP32 58 ms, against 20-22 ms for each of the five int8 ones, none of which either could
beat. So from LEAST_ROUNDS on, a candidate stays timed only while it would be chosen in one of
three trials: its lower quartile of times so far against every other candidate at their upper
quartile, their lower quartile, or their medians. FP32, only reported, is timed for those first
rounds. Candidates the choice still weighs against each other (within the timing tie, or a
trade of score for time) keep every round.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace

import numpy as np

from qdq.plan.build import Candidate

# Each candidate's time in a trial: its lower quartile, median or upper quartile so far (not its
# fastest and slowest: SegFormer's slowest runs, one spike each, left every candidate in).
QUARTILES = (0.25, 0.5, 0.75)


def still_open(
    candidates: Sequence[Candidate], choose: Callable[[list[Candidate]], Candidate]
) -> Callable[[list[list[float]]], set[int]]:
    """For `median_latency_ms`'s `still`: given the times so far (`times[i]` candidate i's, then
    any models after them, which stop), the candidates `choose` might still take; none once at
    most one is left. A candidate once out stays out."""
    out: set[int] = set()

    def still(times: list[list[float]]) -> set[int]:
        ran = times[: len(candidates)]
        fast, middle, slow = ([float(np.quantile(t, q)) for t in ran] for q in QUARTILES)
        for i in set(range(len(candidates))) - out:
            if not any(
                _chosen(candidates, choose, i, fast[i], others) for others in (slow, fast, middle)
            ):
                out.add(i)
        left = set(range(len(candidates))) - out
        return left if len(left) > 1 else set()

    return still


def _chosen(
    candidates: Sequence[Candidate],
    choose: Callable[[list[Candidate]], Candidate],
    i: int,
    own: float,
    others: list[float],
) -> bool:
    """Whether `choose` takes candidate `i` at `own` ms with the others at `others`."""
    trial = [replace(c, latency_ms=own if k == i else others[k]) for k, c in enumerate(candidates)]
    return choose(trial) is trial[i]
