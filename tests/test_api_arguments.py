"""The Python API's arguments: a wrong type or a value past what float32 and int32 can hold
is a qdq error naming the argument, not an AttributeError or an Inf from deep inside."""

from __future__ import annotations

import json

import ml_dtypes
import numpy as np
import pytest

from qdq import QScheme, Range, WeightGrid, choose_qparams, fake_quantize, grid_codes, pipeline
from qdq.arrayfile import open_npz
from qdq.cli.parser import build_parser
from qdq.config import QuantConfig
from qdq.engine import Engine
from qdq.engine import run as engine_run
from qdq.engine.diff import diff_model
from qdq.errors import ArgumentError, DataError, QdqError, SchemeError
from qdq.fixedpoint import INT32_MAX, INT32_MIN, quantize_multiplier, requantize
from qdq.metrics import ErrorStats
from qdq.observers import KL, MSE, Histogram, HistogramObserver, Percentile, make_observer
from qdq.observers.minmax import MovingAverageMinMaxObserver
from qdq.passes.equalize import equalize
from qdq.pipeline import quantize_model
from qdq.qparams import QParams
from qdq.report.compare import compare_models
from qdq.scheme import PerBlock, PerChannel
from qdq.workers import Workers
from qdq.zoo import quantize_many, read_manifest

from conftest import DIGITS

ONES = np.ones((2, 2), np.float32)
CNN = str(DIGITS / "cnn.onnx")
CALIB = str(DIGITS / "calib.npz")

WRONG_TYPES = {
    "QScheme signed": (lambda: QScheme(signed="no"), "signed must be bool"),
    "QScheme narrow_range": (lambda: QScheme(narrow_range=1), "narrow_range must be bool"),
    "PerChannel axis": (lambda: PerChannel("a"), "axis must be an integer"),
    "PerBlock block_size": (lambda: PerBlock(0, 2.5), "block_size must be an integer"),
    "Range of strings": (lambda: Range("a", 1.0), "lo must hold real numbers"),
    "Range of complex": (lambda: Range(0.0, 1j), "hi must hold real numbers"),
    "QParams scheme": (lambda: QParams(1.0, 0, None), "scheme must be QScheme"),
    "QParams zero point": (lambda: QParams(1.0, "a", QScheme()), "zero_point must hold real"),
    "choose_qparams tuple": (lambda: choose_qparams((0, 1), QScheme()), "must be Range"),
    "choose_qparams bits": (lambda: choose_qparams(Range(0, 1), 8), "must be QScheme"),
    "quantize tuple": (lambda: fake_quantize(ONES, (1.0, 0)), "qparams must be QParams"),
    "make_observer scheme": (lambda: make_observer("kl", 8), "must be QScheme"),
    "observer axis float": (
        lambda: HistogramObserver(KL(), axis=1.0).update(ONES),
        "axis must be an integer or None",
    ),
    "observer axis str": (
        lambda: MovingAverageMinMaxObserver(axis="a").update(ONES),
        "axis must be an integer or None",
    ),
    "histogram bins": (lambda: HistogramObserver(KL(), bins="x"), "bins must be an integer"),
    "histogram rule": (lambda: HistogramObserver(None), "rule must be a range rule"),
    "percentile": (lambda: Percentile("99"), "percentile must be a number"),
    "KL bits": (lambda: KL("8"), "bits must be an integer"),
    "MSE bits": (lambda: MSE(8.0), "bits must be an integer"),
    "grid_codes scheme": (
        lambda: grid_codes(ONES, WeightGrid.BINARY, 8),
        "scheme must be QScheme",
    ),
    "config batch_size": (lambda: QuantConfig(batch_size=2.5), "batch_size` must be an integer"),
    "config flag": (lambda: QuantConfig(gptq="no"), "gptq` must be bool"),
    "config weights": (lambda: QuantConfig(weights=8), "weights` must be QScheme"),
    "config input_range nan": (
        lambda: QuantConfig(data_free=True, input_range=(float("nan"), 1.0)),
        "two finite numbers",
    ),
    "config target_sqnr nan": (lambda: QuantConfig(target_sqnr=float("nan")), "finite dB"),
    "quantize_model config dict": (
        lambda: quantize_model(CNN, "/tmp/never.onnx", CALIB, {"method": "minmax"}),
        "config must be QuantConfig",
    ),
    "quantize_model model None": (
        lambda: quantize_model(None, "/tmp/never.onnx", CALIB),
        "model_path must be str or PathLike",
    ),
    "quantize_model calib array": (
        lambda: quantize_model(CNN, "/tmp/never.onnx", np.zeros((4, 1, 8, 8), np.float32)),
        "calibration must be",
    ),
    "quantize_model seed": (
        lambda: quantize_model(CNN, "/tmp/never.onnx", CALIB, seed="1"),
        "seed must be an integer",
    ),
    "compare latency_runs": (
        lambda: compare_models(CNN, CNN, CALIB, latency_runs=-1),
        "latency_runs` must be >= 0",
    ),
    "compare declared string": (
        lambda: compare_models(CNN, CNN, CALIB, declared="logits:1:0-5"),
        "list of part specs",
    ),
    "engine feeds list": (lambda: engine_run(CNN, [ONES]), "feeds must map each input"),
    "engine accumulator bits": (
        lambda: Engine(CNN, accumulator_bits=32.0),
        "accumulator_bits must be an integer",
    ),
    "engine threads": (lambda: Engine(CNN, threads="a"), "threads must be an integer"),
    "engine trace feeds": (lambda: Engine(CNN).trace({"foo": ONES}), "feeds lacks inputs"),
    "diff inputs_from": (lambda: diff_model(CNN, CALIB, inputs_from="x"), "must be ort, engine"),
    "diff max_samples": (lambda: diff_model(CNN, CALIB, max_samples=2.5), "must be an integer"),
    "quantize_model images": (
        lambda: quantize_model(CNN, "/tmp/never.onnx", CALIB, images="x"),
        "images must be ImageOptions",
    ),
    "read_manifest None": (lambda: read_manifest(None), "manifest's path must be str"),
    "quantize_many strings": (lambda: quantize_many(["x"]), "entries must be a list of Entry"),
    "workers count": (lambda: Workers(count="2"), "`workers` must be an integer"),
    "equalize a path": (lambda: equalize(CNN), "model must be ModelProto"),
    "merge with None": (lambda: ErrorStats().merged(None), "merge takes another ErrorStats"),
    "sample -1": (lambda: open_npz(CALIB)["input"].read([-1]), "must lie in 0.."),
    "sample 0.5": (lambda: open_npz(CALIB)["input"].read([0.5]), "must be integers"),
}


@pytest.mark.parametrize(("call", "message"), WRONG_TYPES.values(), ids=WRONG_TYPES)
def test_a_wrong_argument_is_a_qdq_error_naming_it(call, message):
    with pytest.raises(QdqError, match=message):
        call()


def test_type_errors_are_also_python_type_errors():
    """`except TypeError` code written for other libraries still catches them."""
    with pytest.raises(TypeError):
        choose_qparams((0, 1), QScheme())
    assert issubclass(ArgumentError, QdqError)


@pytest.mark.parametrize("method", ["kl", "percentile", "mse"])
@pytest.mark.parametrize(
    "data",
    [
        np.float32(1e-39) * np.random.default_rng(0).standard_normal(10_000).astype(np.float32),
        1e50 * np.random.default_rng(1).standard_normal(10_000),
        1e-50 * np.random.default_rng(2).standard_normal(10_000),
    ],
    ids=["float32 subnormals", "float64 beyond float32", "float64 below float32"],
)
def test_histogram_ranges_cover_data_float32_cannot_bin(method, data):
    """Bins of such widths were binned with float32's 1 / width: 99% of the values fell in the
    central bins and every range held under 1% of the data."""
    observer = make_observer(method)
    observer.update(data)
    rng = observer.compute()
    inside = np.mean((data >= rng.lo) & (data <= rng.hi))
    assert inside > 0.99
    assert max(-rng.lo, rng.hi) <= np.abs(data).max() * (1 + 1e-6)


@pytest.mark.parametrize("scheme", [QScheme(), QScheme(signed=False), QScheme(symmetric=True)])
def test_a_grid_that_would_dequantize_to_inf_is_refused(scheme):
    """[-3.4e38, 3.4e38] gave a scale whose end code times it overflowed float32: fake_quantize
    returned -inf for finite data."""
    with pytest.raises(SchemeError, match="dequantize to Inf"):
        choose_qparams(Range(-3.4e38, 3.4e38), scheme)
    near = np.array([-1e38, 0.0, 1e38], np.float32)
    assert np.isfinite(fake_quantize(near, choose_qparams(Range(-1e38, 1e38), scheme))).all()


def test_a_zero_point_of_the_storage_type_does_not_wrap_in_the_check():
    p = QParams(np.float32(0.5), np.int8(-128), QScheme())
    assert int(p.zero_point) == -128


def test_low_bit_grids_take_a_scalar_weight_and_refuse_scales_past_float32():
    codes, scale = grid_codes(np.float32(-1.0), WeightGrid.BINARY, QScheme(symmetric=True))
    assert codes.shape == ()
    assert (int(codes), float(scale)) == (-1, 1.0)
    huge = QScheme(symmetric=True, power_of_two_scale=True)
    with pytest.raises(DataError, match="beyond float32"):
        grid_codes(np.full((2, 2), 3e38, np.float32), WeightGrid.BINARY, huge)


def test_a_multiplier_past_2_to_the_31_saturates_every_accumulator_but_0():
    """Shifts of 33 and more (a dead ReLU's floor scale gave such multipliers) went past what
    int64 shifts define; the engine must still saturate as ONNX Runtime does."""
    for real in (2.56e9, 1e300):
        m0, shift = quantize_multiplier(real)
        codes = requantize(np.array([0, 1, -1, INT32_MAX, INT32_MIN]), m0, shift, 3, -128, 127)
        assert codes.tolist() == [3, 127, -128, 127, -128]
    with pytest.raises(DataError, match="real number"):
        quantize_multiplier("a")


@pytest.mark.parametrize(("text", "value"), [("-1e-3", -1e-3), ("-2E1", -20.0), ("-.5", -0.5)])
def test_a_negative_number_in_scientific_notation_is_a_value_not_a_flag(text, value):
    args = build_parser().parse_args(
        ["quantize", CNN, "-o", "out.onnx", "--data-free", "--input-range", text, "1"]
    )
    assert args.input_range == [value, 1.0]


def test_compare_says_why_sqnr_is_nan_when_the_float_model_overflows(tmp_path):
    """Inputs of 1e37 overflow the digits CNN to Inf: 'SQNR nan dB' alone came with a raw
    numpy warning on stderr."""
    data = tmp_path / "huge.npz"
    np.savez(data, input=np.full((4, 1, 8, 8), 1e37, np.float32))
    with np.errstate(all="raise"):  # no numpy warning on the way
        comparison = compare_models(CNN, CNN, data, latency_runs=0)
    assert any("'logits' is NaN or Inf" in note for note in comparison.notes)


def test_values_under_1e_305_stay_inside_the_histogram():
    """Their bins' 1 / width was inf in float64: the counts of a channel of them were written
    outside the histogram (counts lost, or a segmentation fault)."""
    histogram = Histogram(axis=0)
    histogram.update(np.array([[1.0, -1.0, 0.5], [1e-306, 0.0, -1e-306]]))
    assert histogram.counts.sum(axis=1).tolist() == [3.0, 3.0]
    lone = Histogram()
    lone.update(np.array([0.0, 1e-306, -1e-306, 5e-307]))
    assert lone.counts.sum() == 4


def test_real_numbers_of_any_type_make_ranges_and_configs():
    """bfloat16 values and an array input range were refused by the first type checks."""
    x = np.ones(4, ml_dtypes.bfloat16)
    assert float(Range(x.min(), x.max()).hi) == 1.0
    config = QuantConfig(data_free=True, input_range=np.array([-2.0, 2.0]))
    assert list(config.input_range) == [-2.0, 2.0]


def test_compare_json_is_standard_json_even_for_exact_outputs():
    """A model compared with itself has infinite SQNR, which json wrote as `Infinity`: no
    parser but Python's reads it."""

    def refuse(constant: str) -> None:
        raise ValueError(constant)

    text = compare_models(CNN, CNN, CALIB, latency_runs=0).to_json()
    parsed = json.loads(text, parse_constant=refuse)
    assert parsed["outputs"]["logits"]["sqnr_db"] is None


def test_a_failure_measuring_the_report_leaves_no_model(tmp_path, monkeypatch):
    """The report's numbers were measured after the file was written: a failure there left it
    behind under 'nothing was written'."""

    def broken(stats: object) -> dict:
        raise RuntimeError("measuring failed")

    monkeypatch.setattr(pipeline, "task_scores", broken)
    out = tmp_path / "q.onnx"
    with pytest.raises(RuntimeError, match="measuring failed"):
        quantize_model(CNN, out, CALIB, QuantConfig(method="minmax", prefer="int8"))
    assert not out.exists()


def test_activations_round_half_to_even_as_quantize_linear_does():
    """qdq's simulations (the auto observer, smoothing, AdaRound) round as the scheme says, the
    file's QuantizeLinear half to even: another rounding would make them disagree on ties."""
    from dataclasses import replace

    from qdq.scheme import UINT8_ACTIVATIONS, Rounding

    with pytest.raises(SchemeError, match="round half to even"):
        QuantConfig(activations=replace(UINT8_ACTIVATIONS, rounding=Rounding.HALF_AWAY))
    QuantConfig(weights=replace(QuantConfig().weights, rounding=Rounding.HALF_AWAY))
