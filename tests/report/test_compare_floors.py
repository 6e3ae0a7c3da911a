"""`qdq compare` measures a tensor whose grid starts at its reader's flat floor (`qdq.plan.floor`)
from that floor: below it the reader's output does not move, so the values clamped there are no
error a user should chase."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

import models
from qdq.config import QuantConfig
from qdq.onnx.model import FLOORS_KEY
from qdq.report.compare import compare_models
from quantize_and_run import quantize_on, run, save, sqnr_db


def test_a_floored_tensor_is_measured_from_its_floor_as_its_reader_sees_it(tmp_path):
    # PP-OCRv5's detector: its first convolution's output, read by a HardSwish, kept 2.4 dB in
    # the per-layer table (every value under -4 clamped there) and headed it; from its floor 23.8
    source = save(models.hard_swish_tail(), tmp_path)
    x = np.random.default_rng(8).standard_normal((64, 3, 8, 8)).astype(np.float32) * 3
    out, _ = quantize_on(source, x, tmp_path, QuantConfig(method="minmax", prefer="int8"))
    quantized = onnx.load(str(out))
    floors = json.loads({p.key: p.value for p in quantized.metadata_props}[FLOORS_KEY])
    assert set(floors) == {"c1", "c2"}  # each convolution's output, read by its HardSwish only
    np.savez(tmp_path / "data.npz", x=x)
    layers = compare_models(source, out, tmp_path / "data.npz", latency_runs=0).layers

    probe = onnx.load(str(source))
    probe.graph.output.append(onnx.ValueInfoProto(name="c1"))
    quantized.graph.output.append(onnx.ValueInfoProto(name="c1_dq"))
    want = run(save(probe, tmp_path, "probe.onnx"), {"x": x})[1]
    got = run(save(quantized, tmp_path, "probe_q.onnx"), {"x": x})[1]
    assert want.min() < floors["c1"] - 1  # the calibrated values reach well under the floor
    from_floor = sqnr_db(np.maximum(want, floors["c1"]), np.maximum(got, floors["c1"]))
    assert layers["c1"].sqnr_db == pytest.approx(from_floor, rel=1e-6)
    assert layers["c1"].sqnr_db > sqnr_db(want, got) + 3
    # why that is fair: the reader, HardSwish (alpha 0.2), makes the same of FP32's values
    # clamped at the floor as of the values themselves
    hard_swish = lambda v: v * np.clip(0.2 * v + 0.5, 0, 1)  # noqa: E731
    assert np.array_equal(hard_swish(np.maximum(want, floors["c1"])), hard_swish(want))


def test_a_tensor_without_a_floor_is_measured_whole(tmp_path):
    source = save(models.conv_net(), tmp_path)
    x = np.random.default_rng(3).standard_normal((32, 3, 8, 8)).astype(np.float32)
    out, _ = quantize_on(source, x, tmp_path)
    quantized = onnx.load(str(out))
    assert json.loads({p.key: p.value for p in quantized.metadata_props}[FLOORS_KEY]) == {}
