"""On a Ray cluster (two nodes simulated on this machine) qdq writes the bytes it writes in one
process."""

from __future__ import annotations

import operator

import pytest

import qdq.plan.calibrate as calibrate_module
from qdq.config import preset_config
from qdq.pipeline import quantize_model
from qdq.report.compare import compare_models
from qdq.workers import Workers, same

from conftest import DIGITS

pytestmark = pytest.mark.slow  # end-to-end: `pytest -m "not slow"` skips it

ray = pytest.importorskip("ray")
cluster_utils = pytest.importorskip("ray.cluster_utils")


@pytest.fixture(scope="module")
def cluster():
    """Two nodes of one CPU each, no dashboard; torn down after this module."""
    nodes = cluster_utils.Cluster(
        initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False}
    )
    nodes.add_node(num_cpus=1)
    ray.init(address=nodes.address, include_dashboard=False, log_to_driver=False)
    nodes.wait_for_nodes(timeout=60)
    yield nodes.address
    ray.shutdown()
    nodes.shutdown()


def _quantized(folder, workers: Workers, name: str, **options: object) -> bytes:
    out = folder / f"{name}.onnx"
    config = preset_config("default", workers=workers, **options)
    quantize_model(DIGITS / "cnn.onnx", out, DIGITS / "calib.npz", config)
    return out.read_bytes()


def test_calibration_on_ray_writes_the_one_process_bytes(cluster, tmp_path, monkeypatch):
    monkeypatch.setattr(calibrate_module, "SHARD_SAMPLES", 64)  # four shards over two nodes
    assert _quantized(tmp_path, Workers(ray=cluster), "ray") == _quantized(
        tmp_path, Workers(1), "one"
    )


def test_the_accuracy_search_on_ray_gives_the_one_process_result(cluster, tmp_path):
    options = {"weight_bits": 4, "target_sqnr": 30.0}
    on_ray = _quantized(tmp_path, Workers(ray=cluster), "ray", **options)
    assert on_ray == _quantized(tmp_path, Workers(1), "one", **options)


def test_evaluation_on_ray_equals_one_process(cluster, tmp_path):
    quantized = tmp_path / "q.onnx"
    quantize_model(DIGITS / "cnn.onnx", quantized, DIGITS / "calib.npz")
    args = (DIGITS / "cnn.onnx", quantized, DIGITS / "test.npz")
    results = [
        compare_models(*args, batch_size=16, latency_runs=0, workers=w).as_dict()
        for w in (Workers(ray=cluster), Workers(1))
    ]
    assert results[0] == results[1]


def test_a_tasks_own_error_comes_back_as_itself(cluster):
    """Not as Ray's wrapper, whose text is the remote traceback in colour."""
    with pytest.raises(ZeroDivisionError, match=r"^division by zero$"):
        Workers(ray=cluster).map(same, operator.truediv, 1, [0, 2])
