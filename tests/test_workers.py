"""Work split over worker processes gives the same files whatever the number of workers, and
survives a worker that dies."""

from __future__ import annotations

import os
import pickle
import signal
from pathlib import Path

import numpy as np
import pytest

import qdq.plan.calibrate as calibrate_module
from qdq.cli import main
from qdq.config import preset_config
from qdq.data import Samples, model_inputs
from qdq.errors import UsageError
from qdq.metrics import REPORT_BLOCK, ErrorStats
from qdq.onnx.model import load_model
from qdq.pipeline import quantize_model
from qdq.report.compare import compare_models
from qdq.workers import Workers, same

from conftest import DIGITS


def _square_plus(offset: int, item: int) -> tuple[int, int]:
    return item * item + offset, os.getpid()


def _quantized(folder: Path, workers: Workers, name: str, **options: object) -> bytes:
    out = folder / f"{name}.onnx"
    config = preset_config("default", workers=workers, **options)
    quantize_model(DIGITS / "cnn.onnx", out, DIGITS / "calib.npz", config)
    return out.read_bytes()


@pytest.fixture
def small_shards(monkeypatch):
    """Shards of 64 of the 256 calibration samples, so that 2 and 3 workers both split them."""
    monkeypatch.setattr(calibrate_module, "SHARD_SAMPLES", 64)


def test_results_come_back_in_item_order_from_every_worker_count():
    items = list(range(20))
    want = [i * i + 7 for i in items]
    for count in (1, 2, 3):
        results = Workers(count).map(same, _square_plus, 7, items)
        assert [value for value, _ in results] == want
    pids = {pid for _, pid in Workers(3).map(same, _square_plus, 7, items)}
    assert os.getpid() not in pids  # the work left this process


def test_a_pool_keeps_its_workers_from_round_to_round():
    with Workers(2).pool(same, _square_plus, 7) as pool:
        first, second = pool.map(list(range(6))), pool.map(list(range(6, 10)))
    assert [value for value, _ in first + second] == [i * i + 7 for i in range(10)]
    pids = {pid for _, pid in first + second}
    assert len(pids) <= 2  # forked once, not once per round
    assert os.getpid() not in pids


def _unopenable(context: object) -> object:
    raise ValueError(f"cannot open {context}")


def test_a_failing_setup_is_its_own_error_not_a_dead_worker(caplog):
    """A setup error (a session ONNX Runtime cannot open) had broken the pool, been retried
    as a dead worker 3 times and ended in "workers kept dying", its cause left out."""
    with pytest.raises(ValueError, match=r"cannot open model\.onnx"):
        Workers(2).map(_unopenable, _square_plus, "model.onnx", list(range(4)))
    assert "a worker died" not in caplog.text


def test_a_single_task_runs_in_this_process():
    assert Workers(2).map(same, _square_plus, 7, [3]) == [(16, os.getpid())]


def test_blocked_error_sums_match_whole_batch_sums():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 50_000)).astype(np.float32)
    y = x + rng.standard_normal(x.shape).astype(np.float32) / 100
    whole, blocked = ErrorStats(), ErrorStats()
    whole.update(x, y)
    blocked.update(x, y, REPORT_BLOCK)
    assert blocked.sqnr_db == pytest.approx(whole.sqnr_db, rel=1e-12)
    assert blocked.max_abs == whole.max_abs
    small = ErrorStats()
    small.update(x[:, :100], y[:, :100], REPORT_BLOCK)  # one block: the whole-batch bits
    again = ErrorStats()
    again.update(x[:, :100], y[:, :100])
    assert small == again


def test_a_worker_count_below_one_is_refused():
    with pytest.raises(UsageError, match="workers"):
        Workers(0)


def test_samples_pickle_without_open_files_and_read_the_same():
    samples = Samples(DIGITS / "calib.npz", model_inputs(load_model(DIGITS / "cnn.onnx")))
    copy = pickle.loads(pickle.dumps(samples))
    first, again = next(samples.batches(8, first=40)), next(copy.batches(8, first=40))
    assert all(np.array_equal(first[k], again[k]) for k in first)


@pytest.mark.usefixtures("small_shards")
def test_one_two_and_three_workers_write_the_same_bytes_over_several_shards(tmp_path):
    one = _quantized(tmp_path, Workers(1), "one")
    assert _quantized(tmp_path, Workers(2), "two") == one
    assert _quantized(tmp_path, Workers(3), "three") == one


@pytest.mark.usefixtures("small_shards")
def test_shards_handed_out_a_window_at_a_time_merge_to_the_same_bytes(tmp_path, monkeypatch):
    """Workers get a few shards at a time (their states wait to be merged: memory stays flat)."""
    one = _quantized(tmp_path, Workers(1), "one")
    monkeypatch.setattr(calibrate_module, "WINDOW_SHARDS", 1)
    assert _quantized(tmp_path, Workers(2), "windowed") == one


def test_minmax_ranges_from_shards_equal_one_pass(small_shards):
    model = load_model(DIGITS / "cnn.onnx")
    samples = Samples(DIGITS / "calib.npz", model_inputs(model))
    names = [o.name for o in model.graph.output] + [n.output[0] for n in model.graph.node]

    def run(workers: Workers) -> dict:
        from qdq.observers import MinMaxObserver

        observers, unfit, _, _ = calibrate_module.observe(
            model, samples, lambda _: MinMaxObserver(), names, 16, False, (), workers
        )
        return calibrate_module.fit_ranges({n: o.compute() for n, o in observers.items()}, unfit)[0]

    one, three = run(Workers(1)), run(Workers(3))
    assert one.keys() == three.keys()
    for name in one:  # min and max merge exactly, so the sharding is invisible
        assert np.array_equal(one[name].lo, three[name].lo)
        assert np.array_equal(one[name].hi, three[name].hi)


def test_calibration_holds_blas_to_one_thread_and_gives_the_rest_back():
    """Calibration's observer threads and ONNX Runtime's already fill the cores; OpenBLAS's own
    threads spun between GPTQ's products and slowed ONNX Runtime's runs (docs/ptq.md)."""
    from threadpoolctl import threadpool_info

    from qdq.observers import MinMaxObserver

    def blas_threads() -> int:
        return max(i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas")

    seen = []

    class Counting(MinMaxObserver):
        def update(self, batch: np.ndarray) -> None:
            seen.append(blas_threads())
            super().update(batch)

    model = load_model(DIGITS / "cnn.onnx")
    samples = Samples(DIGITS / "calib.npz", model_inputs(model))
    before = blas_threads()
    calibrate_module.observe(
        model, samples, lambda _: Counting(), [model.graph.output[0].name], 64, False
    )
    assert seen
    assert set(seen) == {1}
    assert blas_threads() == before


def test_the_accuracy_search_gives_the_one_process_result(tmp_path):
    # 256 samples: one calibration shard, so only the search itself runs on the workers.
    reports = {}
    for count in (1, 2):
        config = preset_config("default", weight_bits=4, target_sqnr=30.0, workers=Workers(count))
        out = tmp_path / f"{count}.onnx"
        reports[count] = quantize_model(DIGITS / "cnn.onnx", out, DIGITS / "calib.npz", config)
    assert (tmp_path / "1.onnx").read_bytes() == (tmp_path / "2.onnx").read_bytes()
    assert reports[1].kept_float == reports[2].kept_float
    assert any("kept float to meet" in d.reason for d in reports[2].kept_float)


@pytest.mark.usefixtures("small_shards")
def test_a_worker_killed_mid_run_is_replaced_and_the_file_is_identical(tmp_path, monkeypatch):
    calm = _quantized(tmp_path, Workers(1), "calm")
    observe, marker = calibrate_module._observe, tmp_path / "killed"

    def dies_once(opened, span):
        if span[0] == 128 and not marker.exists():  # the third shard, its first attempt
            marker.touch()
            os.kill(os.getpid(), signal.SIGKILL)
        return observe(opened, span)

    monkeypatch.setattr(calibrate_module, "_observe", dies_once)
    assert _quantized(tmp_path, Workers(2), "killed") == calm
    assert marker.exists()


@pytest.mark.slow
def test_evaluation_is_the_same_on_one_two_and_three_workers(tmp_path):
    quantized = tmp_path / "q.onnx"
    quantize_model(DIGITS / "cnn.onnx", quantized, DIGITS / "calib.npz")

    def compared(workers: Workers) -> dict:
        args = (DIGITS / "cnn.onnx", quantized, DIGITS / "test.npz")
        return compare_models(*args, batch_size=16, latency_runs=0, workers=workers).as_dict()

    one = compared(Workers(1))
    assert one["samples"] == 540
    assert compared(Workers(2)) == one
    assert compared(Workers(3)) == one


def test_the_cli_takes_workers_and_refuses_workers_with_ray(tmp_path, capsys):
    out = tmp_path / "q.onnx"
    model, calib = str(DIGITS / "cnn.onnx"), str(DIGITS / "calib.npz")
    assert main(["quantize", model, "-o", str(out), "--calib", calib, "--workers", "2"]) == 0
    data = ["--data", str(DIGITS / "test.npz"), "--latency-runs", "0"]
    assert main(["compare", model, str(out), *data, "--workers", "2"]) == 0
    html = ["-o", str(tmp_path / "r.html"), "--data", str(DIGITS / "test.npz")]
    assert main(["report", model, str(out), *html, "--workers", "2"]) == 0
    capsys.readouterr()
    again = ["quantize", model, "-o", str(tmp_path / "r.onnx"), "--calib", calib]
    assert main([*again, "--workers", "2", "--ray", "auto"]) == 2
    assert "not allowed with" in capsys.readouterr().err


def test_a_ray_address_nothing_answers_at_is_refused_at_once(tmp_path, capsys):
    """Ray itself retried 127.0.0.1:1 for minutes, a line per try."""
    pytest.importorskip("ray")
    out = tmp_path / "q.onnx"
    args = ["quantize", str(DIGITS / "cnn.onnx"), "-o", str(out), "--calib"]
    assert main([*args, str(DIGITS / "calib.npz"), "--ray", "127.0.0.1:1"]) == 2
    assert "nothing answers there" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("address", ["", "1.2.3.4:abc"])
def test_a_ray_address_ray_cannot_parse_is_one_line(tmp_path, capsys, address):
    """An unset shell variable (`--ray "$ADDR"`) gave Ray's ValueError as an internal error."""
    pytest.importorskip("ray")
    out = tmp_path / "q.onnx"
    args = ["quantize", str(DIGITS / "cnn.onnx"), "-o", str(out), "--calib"]
    assert main([*args, str(DIGITS / "calib.npz"), "--ray", address]) == 2
    assert "give a running cluster's HOST:PORT" in capsys.readouterr().err
    assert not out.exists()


def test_a_window_holds_two_shards_per_worker(tmp_path, monkeypatch, small_shards):
    """The driver holds a window's shard states until it merges them: two per worker at most
    (16 had held 140 MB more than one worker on a small conv net)."""
    import qdq.workers

    sizes: list[int] = []
    real = qdq.workers.Pool.map

    def recorded(pool, items):
        sizes.append(len(items))
        return real(pool, items)

    monkeypatch.setattr(qdq.workers.Pool, "map", recorded)
    _quantized(tmp_path, Workers(2), "windowed", method="minmax")
    assert max(sizes) <= 4


def test_workers_end_with_their_killed_parent(tmp_path):
    """A driver killed outright (SIGKILL, the out-of-memory killer) had left its workers waiting
    on their queue for ever, holding their memory."""
    import subprocess
    import sys
    import time

    script = (
        "import os, sys, time\n"
        "from qdq.workers import Workers, same\n"
        "def nap(context, item):\n"
        "    os.write(1, f'{os.getpid()}\\n'.encode())  # one write: the two do not interleave\n"
        "    time.sleep(60)\n"
        "Workers(2).map(same, nap, None, [0, 1])\n"
    )
    driver = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    pids = [int(driver.stdout.readline()) for _ in range(2)]
    driver.kill()
    driver.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(_alive(pid) for pid in pids):
        time.sleep(0.1)
    assert not any(_alive(pid) for pid in pids)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
