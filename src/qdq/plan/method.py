"""The default range method, chosen per model by its effect on the outputs (`--method best`).

One histogram per tensor gives every method's range for free (`qdq.observers.Auto`): MinMax,
Percentile, MSE and the per-tensor best of them (KL is left out: its search took 25 of the 30 s
of NudeNet's YOLOv8n candidate ranges, and it scored worst there, 3.8 dB against 10-11). Each
becomes a whole plan, judged by its worst output part (`qdq.plan.parts`) on a few dozen
calibration samples held out of the ranges it judges (ranges scored on the samples they were
fitted to favour MinMax, docs/ptq.md). Percentile, the best single method on the bench
(docs/ptq.md), stays unless another's median per-sample score beats it by MARGIN and the
other scores above it on MAJORITY of the held samples (pooled over a few dozen samples, one
outlier photo decided NudeNet's choice, and lost); the winner's rule then sets the ranges from
all samples. Why: a detector's class scores decide its detections, but a method scored on
the whole output (or on each tensor's own histogram) follows the box coordinates in pixels.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import numpy as np
import onnx
import onnxruntime as ort

from qdq.metrics import sqnr_db
from qdq.observers import MSE, Auto, HistogramObserver, Observer, Percentile, RangeRule
from qdq.onnx.sessions import open_session
from qdq.plan.build import Plan
from qdq.plan.calibrate import fit_ranges
from qdq.plan.parts import Part, output_parts
from qdq.plan.readings import decision_outputs, read_alike
from qdq.plan.reference import Reference
from qdq.qparams import Range
from qdq.scheme import QScheme

log = logging.getLogger(__name__)
CANDIDATES = ("percentile", "minmax", "mse", "auto")  # the first is the default's fallback
# dB by which a candidate must beat the first to replace it: the scores' noise on 32 samples
# (the digits CNN: MSE led percentile by 0.27 dB on the held samples, lost by 1.2 on 540 others).
MARGIN = 0.5
# Share of the held samples on which a candidate must score above the first to replace it.
MAJORITY = 2 / 3
ROW_BLOCK = 1 << 15  # columns of a score's rows summed at a time (`_row_powers`)
# Fit ranges and unfit tensors (with the reason), as `calibrate` returns them.
Fitted = tuple[dict[str, Range], dict[str, str]]
# Rates a model per held sample; stops early where the callable given says the scores so far
# are enough (`choose_method`'s hopeless candidate; None: every sample).
Scorer = Callable[[onnx.ModelProto, Callable[[np.ndarray], bool] | None], float | np.ndarray]


def candidate_ranges(
    observers: dict[str, Observer], unfit: dict[str, str], grid: QScheme
) -> dict[str, Fitted]:
    """Per candidate method, the per-tensor ranges its rule picks on each histogram of a tensor
    not `unfit` (a tensor whose range under any of them reaches a sentinel is unfit under all)."""
    rule = Auto(grid.bits, grid.symmetric, grid.narrow_range, kl=False)
    fit = {name: o for name, o in observers.items() if name not in unfit}
    table = {name: rule.candidates(_histogram(o).histogram) for name, o in fit.items()}
    fitted = {
        method: fit_ranges({n: _squeezed(c[method]) for n, c in table.items()}, unfit)
        for method in CANDIDATES
    }
    every = {name: why for _, unfit_there in fitted.values() for name, why in unfit_there.items()}
    return {
        method: ({n: r for n, r in ranges.items() if n not in every}, every)
        for method, (ranges, _) in fitted.items()
    }


def method_ranges(
    observers: dict[str, Observer], unfit: dict[str, str], grid: QScheme, method: str
) -> Fitted:
    """The ranges of one candidate `method` alone (the chosen one, on every sample)."""
    rules: dict[str, RangeRule] = {
        "minmax": lambda hist: Range(hist.lo, hist.hi),
        "percentile": Percentile(),
        "mse": MSE(grid.bits),
        "auto": Auto(grid.bits, grid.symmetric, grid.narrow_range, kl=False),
    }
    rule = rules[method]
    fit = {name: o for name, o in observers.items() if name not in unfit}
    return fit_ranges({n: _squeezed(rule(_histogram(o).histogram)) for n, o in fit.items()}, unfit)


def choose_method(
    candidates: dict[str, Fitted],
    plan_for: Callable[[Fitted], Plan],
    realize: Callable[[Plan], onnx.ModelProto],
    score: Scorer,
) -> tuple[str, dict[str, float], dict[str, float], dict[str, int]]:
    """The candidate whose plan has the highest median score, if that beats the first's median
    by MARGIN and the first's score on at least MAJORITY of the samples (else the first), every
    candidate's median, the share of the samples on which each scored above the first, and how
    many samples each was scored on; `plan_for` builds a plan from ranges, `realize` its model,
    `score` rates the model per held sample (`sample_scores`; one number counts as one sample;
    higher is better, in dB). A candidate stops being scored once it has lost to the first on
    more samples than MAJORITY leaves it (it can then never replace the first): the same
    choice, and on a batch-1 model, whose samples run one at a time, fewer runs."""

    def scores(method: str, until: Callable[[np.ndarray], bool] | None) -> np.ndarray:
        """One candidate's per-sample scores (its model built, scored and dropped); a NaN
        sample (an output of NaN) is the worst score, not one that voids the median."""
        model = realize(plan_for(candidates[method]))
        values = np.atleast_1d(np.asarray(score(model, until), float))
        return np.where(np.isnan(values), -np.inf, values)

    first, *others = candidates
    per_sample = {first: scores(first, None)}
    total = len(per_sample[first])

    def hopeless(so_far: np.ndarray) -> bool:
        lost = int(np.sum(so_far <= per_sample[first][: len(so_far)]))
        return total - lost < MAJORITY * total

    per_sample |= {method: scores(method, hopeless) for method in others}
    medians = {method: float(np.median(s)) for method, s in per_sample.items()}
    wins = {
        method: float(np.mean(s > per_sample[first][: len(s)])) for method, s in per_sample.items()
    }
    scored = {method: len(s) for method, s in per_sample.items()}
    for method in per_sample:
        log.info("method %s: median worst output part %.2f dB, above %s on %.0f%% of %d samples",
                 method, medians[method], first, 100 * wins[method], scored[method])  # fmt: skip
    contenders = [
        method
        for method in per_sample
        if method != first
        and scored[method] == total
        and medians[method] > medians[first] + MARGIN
        and wins[method] >= MAJORITY
    ]
    return max(contenders, key=medians.__getitem__, default=first), medians, wins, scored


def sample_scores(
    reference: Reference, declared: Sequence[str] = (), decided: float | None = None
) -> Callable[..., np.ndarray]:
    """Scores a candidate per sample of `reference`'s feeds: each sample's lowest SQNR in dB of
    any output part (`qdq.plan.parts`) against FP32's outputs there; `declared` are
    `--output-parts` specs. A feed whose outputs do not share a leading (batch) axis counts as
    one sample. With `decided`, an output of decisions (`decision_outputs`: a recognizer's
    per-step class probabilities) that the candidate reads as FP32 does on every sample scores
    at least `decided` there: what the user gets is those classes, and PP-OCRv6's recognizer
    read every line as FP32 does from 13 dB of probability error. The scorer takes a candidate
    and, as `Scorer`, a test of the scores so far after each feed that ends the scoring early
    (not with `decided`, whose floors need every sample first)."""
    feeds, names, outputs = reference.feeds, reference.names, reference.outputs
    parts = [p for group in output_parts(names, outputs, declared).values() for p in group]
    where = {name: i for i, name in enumerate(names)}
    decisions = decision_outputs(names, outputs) if decided is not None else {}

    def score(
        candidate: onnx.ModelProto, until: Callable[[np.ndarray], bool] | None = None
    ) -> np.ndarray:
        session = open_session(candidate)
        if not decisions:
            return feed_by_feed(session, until)
        got = [session.run(names, feed) for feed in feeds]
        floors = {
            name: float(decided)
            for name, blank in decisions.items()
            if all(
                read_alike(want[where[name]], have[where[name]], blank)
                for want, have in zip(outputs, got, strict=True)
            )
        }
        pairs = zip(outputs, got, strict=True)
        worst = [
            _worst_per_sample(parts, where, *p, n, floors)
            for p, n in zip(pairs, reference.counts, strict=True)
        ]
        return np.concatenate(worst)

    def feed_by_feed(
        session: ort.InferenceSession, until: Callable[[np.ndarray], bool] | None
    ) -> np.ndarray:
        """The scores feed by feed, until `until` holds for those so far."""
        worst: list[np.ndarray] = []
        for want, feed, count in zip(outputs, feeds, reference.counts, strict=True):
            got = session.run(names, feed)
            worst.append(_worst_per_sample(parts, where, want, got, count))
            if until is not None and until(np.concatenate(worst)):
                break
        return np.concatenate(worst)

    return score


def _worst_per_sample(
    parts: list[Part],
    where: dict[str, int],
    want: list[np.ndarray],
    have: list[np.ndarray],
    samples: int,
    floors: dict[str, float] | None = None,
) -> np.ndarray:
    """One feed's per-sample lowest part SQNR: one value per sample where every output leads
    with the feed's `samples` (its batch axis), else one value for the feed; a part of an
    output in `floors` scores at least its floor."""
    batched = all(w.ndim and w.shape[0] == samples for w in want)
    rows = samples if batched else 1
    worst = np.full(rows, np.inf)
    by_name = {name: np.asarray(want[i]) for name, i in where.items()}
    for part in parts:
        i = where[part.output]
        if np.shape(want[i]) != np.shape(have[i]):  # an NMS's rows: another count of boxes
            worst[:] = -np.inf  # the feed's samples cannot be told apart: all of them
            continue
        x, y = part.pair(np.asarray(want[i]), np.asarray(have[i]), by_name)
        value = sqnr_db(*_row_powers(x.reshape(rows, -1), y.reshape(rows, -1)))
        if floors and part.output in floors:
            value = np.maximum(value, floors[part.output])
        worst = np.minimum(worst, value)
    return worst


def _row_powers(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the summed squares of `x` and of `x - y` in float64, a block of columns at a
    time: 16 lines of PP-OCRv6's 40 x 18710 scores in 19 ms, against 36 ms converting whole
    rows (their float64 copies are 100 MB). An infinite value kept exactly counts as no error
    (inf - inf)."""
    signal, noise = np.zeros(len(x)), np.zeros(len(x))
    for start in range(0, x.shape[1], ROW_BLOCK):
        xs = x[:, start : start + ROW_BLOCK].astype(np.float64)
        ys = y[:, start : start + ROW_BLOCK]
        with np.errstate(invalid="ignore"):
            error = xs - ys
        block = np.einsum("ij,ij->i", error, error)
        if not np.isfinite(block).all():
            error = np.where(xs == ys, 0.0, error)
            block = np.einsum("ij,ij->i", error, error)
        signal += np.einsum("ij,ij->i", xs, xs)
        noise += block
    return signal, noise


def _histogram(observer: Observer) -> HistogramObserver:
    if not isinstance(observer, HistogramObserver):
        raise TypeError(f"choosing a method needs histograms, not {type(observer).__name__}")
    return observer


def _squeezed(rng: Range) -> Range:
    """A per-tensor histogram's one-row range as scalars (as `HistogramObserver.compute`)."""
    return Range(rng.lo.reshape(-1)[0], rng.hi.reshape(-1)[0])
