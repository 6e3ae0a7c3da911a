"""GPTQ rounding: codes on the plan's grid whose layer output error beats nearest rounding."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import qdq.passes.gptq
import qdq.ptq
from qdq.affine import quantize
from qdq.onnx.graph import GraphIndex
from qdq.passes.gptq import (
    POSITIONS,
    HessianSums,
    _inverse_upper_factor,
    _layer_codes,
    _positions,
    _terms,
    linear_layers,
)
from qdq.plan.saturation import pair_clipped, pair_safe
from qdq.qparams import QParams
from qdq.scheme import INT8_WEIGHTS

from conftest import digits_cnn_sqnr, quantize_cnn


def _conv_model(weight: np.ndarray, shape: tuple[int, ...], **attrs: object) -> onnx.ModelProto:
    node = helper.make_node("Conv", ["x", "w"], ["y"], name="conv", **attrs)
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(weight, "w")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _per_channel(weight: np.ndarray) -> QParams:
    scale = np.abs(weight).reshape(len(weight), -1).max(axis=1) / 127
    return QParams(scale, np.zeros(len(weight), np.int8), INT8_WEIGHTS)


@pytest.mark.parametrize(
    "attrs",
    [
        {"pads": [1, 1, 1, 1]},
        {"pads": [0, 2, 1, 0], "strides": [2, 1], "dilations": [1, 2]},
        {"group": 2, "pads": [1, 1, 1, 1]},
        {"group": 4, "auto_pad": "SAME_UPPER", "strides": [2, 2]},
    ],
)
def test_terms_are_what_onnx_runtime_sums(attrs):
    """Each output is the weight row times its terms (a batch's positions sample by sample):
    the order H is built in."""
    rng = np.random.default_rng(0)
    group = attrs.get("group", 1)
    weight = rng.normal(size=(8, 4 // group, 3, 3)).astype(np.float32)
    x = rng.normal(size=(2, 4, 9, 7)).astype(np.float32)
    model = _conv_model(weight, x.shape, **attrs)
    want = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})[0]
    cols = _terms(model.graph.node[0], x, weight.shape)
    rows = weight.reshape(group, 8 // group, -1)
    n, channels, height, width = want.shape
    got = np.matmul(rows, cols).reshape(channels, n, height, width).transpose(1, 0, 2, 3)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def _output_error(weight, codes, qparams, h):
    """Summed squared output error of the dequantized codes, from H (1 group)."""
    delta = (weight - codes * qparams.scale[:, None, None, None]).reshape(len(weight), -1)
    return float(np.einsum("od,de,oe->", delta, h[0], delta))


def test_edge_filters_on_flat_input_keep_their_output(tmp_path):
    """A depthwise edge filter (weights summing to ~0) on nearly constant input: nearest
    rounding changes its sum by up to 4.5 steps, which the output shows; GPTQ's error is far
    smaller (the case EfficientNet-Lite0's first depthwise convolution is)."""
    rng = np.random.default_rng(1)
    weight = rng.normal(size=(16, 1, 3, 3)).astype(np.float32)
    weight -= weight.mean(axis=(2, 3), keepdims=True)
    x = (3.0 + 0.01 * rng.normal(size=(8, 16, 12, 12))).astype(np.float32)
    model = _conv_model(weight, (None, 16, 12, 12), group=16, pads=[1, 1, 1, 1])
    index = GraphIndex(model)
    (layer,) = linear_layers(index, ["conv"])
    h = _hessians(index, [layer], x)["conv"]
    assert h.shape == (16, 9, 9)
    qparams = _per_channel(weight)
    nearest = quantize(weight, qparams)
    codes = _layer_codes(layer, weight, qparams, h, pairs=False)
    assert codes.dtype == np.int8
    assert np.abs(codes.astype(int) - nearest).max() <= 2
    session = ort.InferenceSession(model.SerializeToString())
    want = session.run(None, {"x": x})[0]

    def error(c):
        quantized = _conv_model(
            c * qparams.scale.reshape(-1, 1, 1, 1), (None, 16, 12, 12), group=16, pads=[1, 1, 1, 1]
        )
        got = ort.InferenceSession(quantized.SerializeToString()).run(None, {"x": x})[0]
        return float(np.square(got - want).sum())

    assert error(codes) < 0.1 * error(nearest)


def test_dense_layer_output_error_falls_on_correlated_inputs():
    rng = np.random.default_rng(2)
    weight = rng.normal(size=(12, 6, 3, 3)).astype(np.float32)
    base = rng.normal(size=(16, 1, 10, 10))
    x = (base + 0.3 * rng.normal(size=(16, 6, 10, 10))).astype(np.float32)  # shared part
    model = _conv_model(weight, (None, 6, 10, 10), pads=[1, 1, 1, 1])
    index = GraphIndex(model)
    h = _hessians(index, linear_layers(index, ["conv"]), x[:8], x[8:])
    qparams = _per_channel(weight)
    codes = _layer_codes(model.graph.node[0], weight, qparams, h["conv"], pairs=False)
    nearest = quantize(weight, qparams)
    gptq, plain = (_output_error(weight, c, qparams, h["conv"]) for c in (codes, nearest))
    assert gptq < 0.5 * plain
    assert codes.min() >= -127
    assert codes.max() <= 127


def test_pair_safe_codes_stay_pair_safe():
    """Where x86 kernels without VNNI clamp, the plan's scales are pair-safe for nearest
    rounding; GPTQ's codes, which may grow, are clipped back to that."""
    rng = np.random.default_rng(15)  # a draw where GPTQ alone passes a pair's limit
    weight = rng.normal(size=(8, 16, 1, 1)) * rng.uniform(0.2, 3, size=(8, 16, 1, 1))
    weight = weight.astype(np.float32)
    base = rng.normal(size=(4, 1, 6, 6))  # channels that move together
    x = base * rng.normal(size=(1, 16, 1, 1)) + 0.1 * rng.normal(size=(4, 16, 6, 6))
    x = x.astype(np.float32)
    model = _conv_model(weight, (None, 16, 6, 6))
    index = GraphIndex(model)
    h = _hessians(index, linear_layers(index, ["conv"]), x)["conv"]
    node = model.graph.node[0]
    qparams = pair_safe(_per_channel(weight), node, weight)
    safe = lambda c: np.array_equal(pair_clipped(node, c), c)  # noqa: E731
    assert safe(quantize(weight, qparams))
    assert not safe(_layer_codes(node, weight, qparams, h, pairs=False))
    assert safe(_layer_codes(node, weight, qparams, h, pairs=True))


def test_layers_too_wide_or_not_linear_keep_nearest_rounding():
    weight = np.ones((2, 3, 1, 1), np.float32)
    index = GraphIndex(_conv_model(weight, (1, 3, 4, 4)))
    assert [n.name for n in linear_layers(index, ["conv"])] == ["conv"]
    assert linear_layers(index, ["other"]) == []


@pytest.mark.slow
def test_default_beats_nearest_rounding_on_the_digits_cnn_at_4_bits(tmp_path):
    """The pipeline's default rounds for the output: 4-bit weights gain (measured below)."""
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    gptq, _ = quantize_cnn(tmp_path / "a", weight_bits=4, prefer="speed")
    nearest, _ = quantize_cnn(tmp_path / "b", weight_bits=4, prefer="speed", gptq=False)
    assert digits_cnn_sqnr(gptq) > digits_cnn_sqnr(nearest) + 1.0


def test_overflowing_inputs_keep_nearest_rounding():
    """Inputs whose squares overflow float32 (an unmasked -3.4e38 sentinel) make no codes."""
    weight = np.ones((2, 3, 1, 1), np.float32)
    model = _conv_model(weight, (1, 3, 2, 2))
    index = GraphIndex(model)
    x = np.full((1, 3, 2, 2), 3e38, np.float32)
    h = _hessians(index, linear_layers(index, ["conv"]), x)["conv"]
    assert _layer_codes(model.graph.node[0], weight, _per_channel(weight), h, False) is None


@pytest.mark.parametrize(("scores", "kept"), [((1.0, 0.0), "GPTQ"), ((0.0, 1.0), "nearest")])
def test_the_rounding_that_scores_better_on_held_out_samples_is_kept(
    tmp_path, monkeypatch, scores, kept
):
    """GPTQ's codes are kept only where the held-out samples score them at least as well as
    nearest rounding (scored GPTQ first): else the file holds nearest rounding's codes."""
    given = iter(scores)
    monkeypatch.setattr(qdq.ptq, "sqnr_score", lambda *a, **k: lambda model: next(given))
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    checked, report = quantize_cnn(tmp_path / "a", prefer="int8")
    nearest, _ = quantize_cnn(tmp_path / "b", prefer="int8", gptq=False)
    assert any(note.startswith(f"weight rounding: {kept} ") for note in report.notes)
    same = _weights(checked) == _weights(nearest)
    assert same == (kept == "nearest")


def _weights(path) -> dict[str, bytes]:
    model = onnx.load(path)
    return {t.name: t.raw_data for t in model.graph.initializer if t.data_type == TensorProto.INT8}


def test_h_sums_the_first_samples_of_a_stream_in_any_batches_and_shards():
    """Calibration hands H its batches as they come (a first sample alone, then batches, in
    shards): H is the sum over the first `limit` samples whatever the split."""
    rng = np.random.default_rng(4)
    weight = rng.normal(size=(4, 3, 3, 3)).astype(np.float32)
    x = rng.normal(size=(16, 3, 6, 6)).astype(np.float32)
    index = GraphIndex(_conv_model(weight, (None, 3, 6, 6), pads=[1, 1, 1, 1]))
    layers = linear_layers(index, ["conv"])
    whole = _hessians(index, layers, x[:8])["conv"]
    first = HessianSums(index, layers, limit=8)
    _take(first, {"x": x[:1]}, 1)
    _take(first, {"x": x[1:5]}, 4)
    later = first.after(5)  # the next shard: samples 5 on
    _take(later, {"x": x[5:16]}, 11)
    _take(later, {"x": x}, 16)  # past the limit: ignored
    first.merge(later)
    got = first.found()["conv"]
    np.testing.assert_allclose(got, whole, rtol=1e-5, atol=1e-5 * np.abs(whole).max())


@pytest.mark.parametrize("group", [1, 2])
def test_h_is_each_groups_terms_times_their_transpose(group):
    """H per group is the sum of the outer products of the terms each output of that group
    reads, one group or several."""
    rng = np.random.default_rng(5)
    weight = rng.normal(size=(4, 4 // group, 3, 3)).astype(np.float32)
    x = rng.normal(size=(3, 4, 5, 5)).astype(np.float32)
    index = GraphIndex(_conv_model(weight, (None, 4, 5, 5), pads=[1, 1, 1, 1], group=group))
    got = _hessians(index, linear_layers(index, ["conv"]), x)["conv"]
    cols = _terms(index.nodes[0], x, weight.shape).astype(np.float64)
    want = np.einsum("gtp,gup->gtu", cols, cols)
    assert got.shape == (group, 4 // group * 9, 4 // group * 9)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_a_failure_while_summing_is_raised_by_found_not_update(monkeypatch):
    """Calibration goes on; only the GPTQ stage, which asks for H, is skipped."""
    weight = np.ones((2, 3, 1, 1), np.float32)
    index = GraphIndex(_conv_model(weight, (None, 3, 2, 2)))
    sums = HessianSums(index, linear_layers(index, ["conv"]), limit=4)
    _take(sums, {"other": np.zeros((1, 3, 2, 2), np.float32)}, 1)  # no "x": a KeyError
    with pytest.raises(KeyError):
        sums.found()


def _take(sums: HessianSums, values: dict[str, np.ndarray], samples: int) -> None:
    """A batch into `sums`, its layers' jobs one after another (calibration runs them on its
    threads)."""
    for job in sums.jobs(values, samples):
        job()


def _hessians(index: GraphIndex, layers: list, *batches: np.ndarray) -> dict[str, np.ndarray]:
    """H of `layers` (whose input is "x") over `batches`, all of them."""
    sums = HessianSums(index, layers, limit=sum(len(b) for b in batches))
    for batch in batches:
        _take(sums, {"x": batch}, len(batch))
    return sums.found()


@pytest.mark.parametrize(("groups", "terms"), [(3, 9), (2, 129), (1, 300)])
def test_the_inverse_factor_is_the_upper_cholesky_factor_of_h_inverse(groups, terms):
    """GPTQ spreads each rounding error along U with H^-1 = U^T U; found without inverting H
    (sizes on both sides of the halving's base case)."""
    x = np.random.default_rng(terms).normal(size=(groups, terms, 3 * terms))
    x[:, 0] *= 100.0  # one loud term, as activations have
    h = x @ x.transpose(0, 2, 1)
    upper = _inverse_upper_factor(h)
    np.testing.assert_array_equal(np.tril(upper, -1), 0.0)
    expected = np.linalg.cholesky(np.linalg.inv(h)).transpose(0, 2, 1)
    np.testing.assert_allclose(upper, expected, rtol=1e-9, atol=1e-12 * np.abs(expected).max())


@pytest.mark.parametrize(
    "attrs",
    [
        {"pads": [1, 1, 1, 1]},
        {"pads": [0, 2, 1, 0], "strides": [2, 1], "dilations": [1, 2]},
        {"group": 2, "auto_pad": "SAME_UPPER", "strides": [2, 2]},
    ],
)
def test_positions_drawn_ahead_pick_the_same_terms_as_all_of_them(attrs):
    """A Conv's positions are drawn before its products (in the stream's order, so that the
    layers' jobs may run on any thread): each picked column is that output position's terms."""
    rng = np.random.default_rng(6)
    weight = rng.normal(size=(4, 4 // attrs.get("group", 1), 3, 3)).astype(np.float32)
    x = rng.normal(size=(2, 4, 40, 36)).astype(np.float32)
    node = GraphIndex(_conv_model(weight, (None, 4, 40, 36), **attrs)).nodes[0]
    every = _terms(node, x, weight.shape)
    picked = _positions(node, x.shape, weight.shape, np.random.default_rng(0))
    assert picked is not None
    assert len(picked) == 2 * POSITIONS
    assert picked.max() < every.shape[2]
    np.testing.assert_array_equal(_terms(node, x, weight.shape, picked), every[:, :, picked])


def test_h_from_jobs_run_in_any_order_is_h_from_one_after_another():
    """Calibration runs each layer's job on whichever thread is free: H is the same."""
    rng = np.random.default_rng(7)
    first, second = (rng.normal(size=(4, 4, 3, 3)).astype(np.float32) for _ in range(2))
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["h"], name="c1", pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["h", "w2"], ["y"], name="c2", pads=[1, 1, 1, 1]),
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4, 24, 24])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(first, "w1"), numpy_helper.from_array(second, "w2")],
    )  # fmt: skip
    index = GraphIndex(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    layers = linear_layers(index, ["c1", "c2"])
    batches = [{"x": rng.normal(size=(1, 4, 24, 24)), "h": rng.normal(size=(1, 4, 24, 24))}
               for _ in range(3)]  # fmt: skip
    in_order, reversed_jobs = HessianSums(index, layers, 3), HessianSums(index, layers, 3)
    for batch in batches:
        _take(in_order, batch, 1)
        for job in reversed(reversed_jobs.jobs(batch, 1)):
            job()
    assert in_order.found().keys() == {"c1", "c2"}
    for name, h in in_order.found().items():
        np.testing.assert_array_equal(reversed_jobs.found()[name], h)
