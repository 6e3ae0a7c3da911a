"""Weight rounding that minimizes each layer's output error on calibration data (GPTQ).

Nearest rounding minimizes each weight's own error; a layer's output error is
`dW^T H dW` with `H = E[x x^T]` the second moment of the terms its sums read. Where inputs
are correlated, errors that cancel along `H` matter, not their size: a depthwise edge filter
whose nine weights sum to almost zero, on an input whose neighbouring values are almost equal,
changes its output by the *sum* of its rounding errors, which nearest rounding leaves at up to
4.5 steps (docs/quantization.md §21). GPTQ (Frantar et al. 2023, after Optimal Brain
Quantization) rounds one term at a time and spreads its error over the terms not yet rounded,
along `H^-1`'s Cholesky factor: closed form, no training, seconds per model. Measured on
EfficientNet-Lite0 (weights only, 8-bit per channel, the first 32 calibration crops):
17.8 dB output SQNR with nearest rounding, 27.7 dB with this.

`H` comes from the float model's layer inputs on the first `SAMPLES` calibration samples,
summed in the calibration pass itself (`HessianSums`; memory: one `H` per layer, none per
sample). The codes keep the plan's scales and zero points; bias correction then cancels what
mean error is left.
"""

from __future__ import annotations

import copy
import logging
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from functools import partial

import numpy as np
import onnx

from qdq.affine import quantize
from qdq.onnx.conv import ConvGeometry
from qdq.onnx.graph import GraphIndex, attributes
from qdq.plan.build import Key, Plan
from qdq.plan.rules import weight_axis
from qdq.plan.saturation import pair_clipped
from qdq.qparams import QParams
from qdq.scheme import QScheme

log = logging.getLogger(__name__)

SAMPLES = 32  # calibration samples whose layer inputs make H (as many as AdaRound's)
MAX_TERMS = 1024  # a layer whose sums read more terms keeps nearest rounding (H: memory, time)
DAMPING = 0.01  # of H's mean diagonal, added to it (GPTQ's value): H may be singular
# Terms rounded before their error reaches the rest in one matrix product. Within a block each
# term updates the block's later terms row by row, so a smaller block moves less memory; 64
# took ddddocr's 8210 x 1024 Gemm from 1.13 to 0.84 s and a 3072 x 768 layer from 0.27 to
# 0.18 s against 128, the same codes, and no layer shape up to MAX_TERMS tried ran slower.
BLOCK = 64
POSITIONS = 256  # a Conv's output positions per sample whose terms make H, at random
CHUNK = 1 << 24  # floats of a Conv's terms gathered for one product (64 MB)


def linear_layers(index: GraphIndex, names: Iterable[str]) -> list[onnx.NodeProto]:
    """The nodes among `names` whose rounding this pass can set: 2-D Conv, Gemm (input not
    transposed) and MatMul with a constant 2-D weight of at most `MAX_TERMS` terms per sum."""
    layers, wanted = [], set(names)
    for node in (n for n in index.nodes if n.name in wanted):
        if len(node.input) < 2 or not index.is_constant(node.input[1]):
            continue
        weight = index.constant(node.input[1])
        if node.op_type == "Conv" and weight.ndim == 4:
            terms = int(np.prod(weight.shape[1:]))
        elif node.op_type in ("Gemm", "MatMul") and weight.ndim == 2:
            if attributes(node).get("transA", 0):
                continue  # its input's rows are not its sums' terms
            terms = weight.shape[1 - weight_axis(node, 2)]
        else:
            continue
        if terms <= MAX_TERMS:
            layers.append(node)
    return layers


class HessianSums:
    """Per layer, `H` (groups, terms, terms): the summed outer products of the terms each
    output's sum reads, over the float model's inputs to it on the first `limit` samples of a
    stream. Calibration feeds it the layer inputs it fetches anyway, so H costs no pass of its
    own (that pass was 2.8 s of ONNX Runtime in ddddocr's detector's 40 s). One per calibration
    shard (`after`), merged by sum; a failure is kept for `found` to raise, so that calibration
    goes on and only GPTQ is skipped."""

    def __init__(self, index: GraphIndex, layers: list[onnx.NodeProto], limit: int) -> None:
        self.layers = layers
        self.shapes = {node.name: tuple(index.initializers[node.input[1]].dims) for node in layers}
        self.inputs = list(dict.fromkeys(node.input[0] for node in layers))
        self.limit = self.missing = max(limit, 0)
        self.sums: dict[str, np.ndarray] = {}
        self.error: Exception | None = None
        self.start = 0  # the stream's sample this one's first sample is
        self._rng = np.random.default_rng(self.start)  # a shard's positions: its own draws

    def after(self, first: int) -> HessianSums:
        """An empty accumulator for the stream's samples from `first` on (a later shard)."""
        later = copy.copy(self)
        later.limit = later.missing = max(self.limit - first, 0)
        later.sums, later.error, later.start = {}, None, self.start + first
        later._rng = np.random.default_rng(later.start)
        return later

    def jobs(self, values: Mapping[str, np.ndarray], samples: int) -> list[Callable[[], None]]:
        """The work of adding a batch of `samples` samples (each layer's input by name in
        `values`), one job per layer, which may run at once on calibration's threads: each
        adds to its own layer's H. What must follow the stream's order happens here: the
        samples counted and each layer's positions drawn, so H does not depend on the threads
        (ddddocr's detector's 79 layers took 93 ms a sample on one thread while the other
        idled). Of a batch past `limit`, the samples before it where a tensor leads with them,
        else all of it."""
        if self.missing <= 0 or self.error is not None:
            return []
        take = min(samples, self.missing)
        self.missing -= take
        try:
            pieces = []
            for node in self.layers:
                value = values[node.input[0]]
                value = value[:take] if len(value) == samples else value
                pieces.append((node, _pieces(node, self.shapes[node.name], value, self._rng)))
        except Exception as error:  # found() raises it: the GPTQ stage is skipped, not calibration
            self.error = error
            return []
        return [partial(self._add, node, layer_pieces) for node, layer_pieces in pieces]

    def _add(
        self, node: onnx.NodeProto, pieces: list[tuple[np.ndarray, np.ndarray | None]]
    ) -> None:
        try:
            _accumulate(self.sums, node, self.shapes[node.name], pieces)
        except Exception as error:  # as in `jobs`: kept for found()
            self.error = self.error or error

    def merge(self, other: HessianSums) -> None:
        """Add a later shard's sums."""
        self.error = self.error or other.error
        for name, h in other.sums.items():
            self.sums[name] = self.sums[name] + h if name in self.sums else h

    def found(self) -> dict[str, np.ndarray]:
        """H per layer that had inputs; raises what failed while summing, if anything did."""
        if self.error is not None:
            raise self.error
        return self.sums


def _pieces(
    node: onnx.NodeProto, shape: tuple[int, ...], value: np.ndarray, rng: np.random.Generator
) -> list[tuple[np.ndarray, np.ndarray | None]]:
    """`node`'s input `value` in the pieces whose products make its H (a few large matrix
    products, each under CHUNK floats), each with its output positions drawn from `rng` (None:
    all of them); `shape`: the node's weight's."""
    x = np.asarray(value, np.float32)
    if node.op_type == "Conv" and x.ndim != 4:
        return []
    size = max(1, x[:1].size * int(np.prod(shape[2:])))
    step = max(1, CHUNK // size) if node.op_type == "Conv" else len(x)
    pieces = (x[start : start + step] for start in range(0, len(x), step))
    return [(piece, _positions(node, piece.shape, shape, rng)) for piece in pieces]


def _positions(
    node: onnx.NodeProto,
    x_shape: tuple[int, ...],
    shape: tuple[int, ...],
    rng: np.random.Generator,
) -> np.ndarray | None:
    """`POSITIONS` output positions per sample of a Conv's at random, sorted (H costs its
    terms times the layer's own work, and a few hundred positions per sample estimate it), as
    indices into (samples, rows, columns); None where the Conv has no more than that, or for
    another op."""
    if node.op_type != "Conv":
        return None
    g = ConvGeometry.from_attributes(attributes(node), x_shape, shape)
    oh, ow = g.output_size(x_shape[2], x_shape[3])
    if oh * ow <= POSITIONS:
        return None
    n = x_shape[0]
    return np.sort(rng.choice(n * oh * ow, n * POSITIONS, replace=False))


def _accumulate(
    found: dict[str, np.ndarray],
    node: onnx.NodeProto,
    shape: tuple[int, ...],
    pieces: list[tuple[np.ndarray, np.ndarray | None]],
) -> None:
    """Add the outer products of `node`'s terms in each of its input's `pieces` (`_pieces`)
    to its H in `found`; `shape`: the node's weight's."""
    for piece, picked in pieces:
        cols = _terms(node, piece, shape, picked)
        # inputs near 1e19 overflow the products: H goes Inf or NaN, and GPTQ keeps nearest
        # rounding for that layer (`_gptq`), with no numpy warning on the user's terminal
        with np.errstate(over="ignore", invalid="ignore"):
            h = np.matmul(cols, cols.transpose(0, 2, 1))
            if node.name in found:  # in place: a batch-1 model adds a sample at a time
                np.add(found[node.name], h, out=found[node.name])
            else:
                found[node.name] = h.astype(np.float64)


def _terms(
    node: onnx.NodeProto,
    x: np.ndarray,
    shape: tuple[int, ...],
    picked: np.ndarray | None = None,
) -> np.ndarray:
    """The terms `node`'s sums read from input `x` (a 4-D batch for a Conv whose weight has
    `shape`): (groups, terms, positions), terms in the order of the weight's own flattening,
    positions sample by sample; of a Conv's, only those `picked` (`_positions`), if given."""
    if node.op_type != "Conv":
        return x.reshape(-1, x.shape[-1]).T[None]
    g = ConvGeometry.from_attributes(attributes(node), x.shape, shape)
    top, left, bottom, right = g.pads
    padded = np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)))
    (kh, kw), (dh, dw), (sh, sw) = g.kernel, g.dilations, g.strides
    windows = np.lib.stride_tricks.sliding_window_view(
        padded, ((kh - 1) * dh + 1, (kw - 1) * dw + 1), axis=(2, 3)
    )[:, :, ::sh, ::sw, ::dh, ::dw]  # (N, C, OH, OW, kh, kw), a view
    n, c, oh, ow = windows.shape[:4]
    if picked is not None:
        sample, row, column = np.unravel_index(picked, (n, oh, ow))
        taken = windows[sample, :, row, column]  # (positions, C, kh, kw)
        cols = taken.reshape(-1, g.group, c // g.group, kh, kw).transpose(1, 2, 3, 4, 0)
        return cols.reshape(g.group, (c // g.group) * kh * kw, -1)
    grouped = windows.reshape(n, g.group, c // g.group, oh, ow, kh, kw)
    cols = grouped.transpose(1, 2, 5, 6, 0, 3, 4)  # (groups, C/g, kh, kw, N, OH, OW)
    return cols.reshape(g.group, (c // g.group) * kh * kw, n * oh * ow)


def rounded_codes(
    index: GraphIndex,
    plan: Plan,
    found: dict[str, np.ndarray],
    pairs: bool,
    cache: dict[tuple, np.ndarray | None],
) -> dict[Key, np.ndarray]:
    """GPTQ codes for every layer in `found` that `plan` quantizes with a uniform grid;
    `pairs`: kept pair-safe as nearest rounding is (`qdq.plan.saturation`). `cache` holds
    codes by layer and qparams (re-plans mostly keep the weights' scales). Layers that read
    one weight with the same qparams get one set of codes, rounded on the sum of their `H`
    (the error of all their outputs), so that the file holds that weight once: rounded per
    layer, basic-pitch's CQT kernels, each read by 9 convolutions, made its file 2.1x FP32's."""
    codes: dict[Key, np.ndarray] = {}
    nodes = {node.name: node for node in index.nodes}
    shared: dict[tuple, list[str]] = defaultdict(list)
    for name, h in found.items():
        qparams = plan.constants.get((name, 1))
        if qparams is None or (name, 1) in plan.grid_codes:
            continue
        node = nodes[name]
        weight = node.input[1]
        axis = weight_axis(node, len(index.initializers[weight].dims))
        group = (weight, node.op_type, axis, h.shape, qparams.scale.tobytes())
        shared[(*group, qparams.zero_point.tobytes())].append(name)
    for readers in shared.values():
        first = nodes[readers[0]]
        qparams = plan.constants[(readers[0], 1)]
        tag = (*readers, qparams.scale.tobytes(), qparams.zero_point.tobytes(), pairs)
        if tag not in cache:
            h = sum(found[name] for name in readers)
            weight = index.constant(first.input[1])
            cache[tag] = _layer_codes(first, weight, qparams, h, pairs)
        if cache[tag] is not None:
            codes.update(((name, 1), cache[tag]) for name in readers)
    return codes


def _layer_codes(
    node: onnx.NodeProto, weight: np.ndarray, qparams: QParams, h: np.ndarray, pairs: bool
) -> np.ndarray | None:
    """The layer's GPTQ codes; None (nearest rounding) where its inputs reached values whose
    squares overflow, or `H` is not positive definite even damped."""
    if not np.isfinite(h).all():
        log.info("GPTQ: %s keeps nearest rounding (its inputs' second moments overflow)", node.name)
        return None
    axis = weight_axis(node, weight.ndim)
    rows = np.moveaxis(weight, axis, 0)  # (outputs, terms...) in the weight's own order
    outputs, groups = rows.shape[0], h.shape[0]
    scale = np.broadcast_to(qparams.scale.reshape(-1), (outputs,)).astype(np.float64)
    zero = np.broadcast_to(qparams.zero_point.reshape(-1), (outputs,)).astype(np.float64)
    w = rows.reshape(groups, outputs // groups, -1).astype(np.float64)
    shape = (groups, outputs // groups)
    try:
        q = _gptq(w, h, scale.reshape(shape), zero.reshape(shape), qparams.scheme)
    except np.linalg.LinAlgError:
        log.info("GPTQ: %s keeps nearest rounding (H is singular)", node.name)
        return None
    codes = np.moveaxis(q.reshape(rows.shape), 0, axis).astype(qparams.scheme.storage_dtype)
    if pairs:
        codes = pair_clipped(node, codes, quantize(weight, qparams))
    return codes


def _gptq(
    w: np.ndarray, h: np.ndarray, scale: np.ndarray, zero: np.ndarray, scheme: QScheme
) -> np.ndarray:
    """Codes of `w` (groups, outputs, terms) rounded in term order, each term's error spread
    over the later terms through the upper Cholesky factor of `H^-1` (GPTQ's lazy blocks)."""
    terms = w.shape[2]
    h = h.copy()
    diagonal = np.einsum("gii->gi", h)
    dead = diagonal == 0  # a term that is always zero: any code, no effect
    h[:, np.arange(terms), np.arange(terms)] += (
        DAMPING * diagonal.mean(axis=1, keepdims=True) + dead
    )
    upper = _inverse_upper_factor(h)
    w = w.copy()
    codes = np.empty_like(w)
    for start in range(0, terms, BLOCK):
        stop = min(start + BLOCK, terms)
        # the block term-major: each step reads and updates whole rows, not strided columns
        # (5.4 -> 1.0 s for a 8210 x 1024 Gemm, the same codes)
        part = np.ascontiguousarray(w[:, :, start:stop].transpose(0, 2, 1))
        got, errors = np.empty_like(part), np.empty_like(part)
        for j, i in enumerate(range(start, stop)):
            code = np.clip(np.round(part[:, j] / scale) + zero, scheme.qmin, scheme.qmax)
            got[:, j] = code
            error = (part[:, j] - (code - zero) * scale) / upper[:, i, i][:, None]
            part[:, j + 1 :] -= upper[:, i, i + 1 : stop, None] * error[:, None, :]
            errors[:, j] = error
        codes[:, :, start:stop] = got.transpose(0, 2, 1)
        w[:, :, stop:] -= np.matmul(errors.transpose(0, 2, 1), upper[:, start:stop, stop:])
    return codes


def _inverse_upper_factor(h: np.ndarray) -> np.ndarray:
    """The upper Cholesky factor `U` of each `H^-1` (`H^-1 = U^T U`), without forming `H^-1`:
    with `J` the reversal, `J H J = C C^T` gives `U = J C^-1 J`. One factorization and one
    triangular inverse instead of an inverse and a factorization: 0.09 -> 0.03 s for a
    1024-term layer, the same factor to 2e-15 (scratch `/work/notes/r70/triinv.py`)."""
    lower = np.linalg.cholesky(h[:, ::-1, ::-1])
    return np.ascontiguousarray(_lower_inverse(lower)[:, ::-1, ::-1])


def _lower_inverse(c: np.ndarray) -> np.ndarray:
    """The inverse of each lower-triangular `c`, by halves: the inverse of `[[A, 0], [B, D]]` is
    `[[A^-1, 0], [-D^-1 B A^-1, D^-1]]`, so the work is matrix products."""
    n = c.shape[-1]
    if n <= 128:
        return np.tril(np.linalg.inv(c))
    k = n // 2
    a, d = _lower_inverse(c[:, :k, :k]), _lower_inverse(c[:, k:, k:])
    out = np.zeros_like(c)
    out[:, :k, :k], out[:, k:, k:] = a, d
    out[:, k:, :k] = -(d @ c[:, k:, :k]) @ a
    return out
