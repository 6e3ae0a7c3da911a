"""`qdq run`: feed an .npz through a model and write the outputs to an .npz, atomically."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort

from qdq.data import model_inputs
from qdq.engine.executor import Engine
from qdq.errors import DataError
from qdq.onnx.model import load_model


def run_command(
    model_path: str, inputs: str, output: str, engine: str, requant: str, accumulator_bits: int
) -> str:
    model = load_model(model_path)
    feeds = _read_feeds(Path(inputs), [s.name for s in model_inputs(model)])
    if engine == "ort":
        session = ort.InferenceSession(
            model.SerializeToString(), providers=["CPUExecutionProvider"]
        )
        names = [o.name for o in session.get_outputs()]
        results = dict(zip(names, session.run(names, feeds), strict=True))
        notes = ["ran with ONNX Runtime"]
    else:
        runner = Engine(model, requant, accumulator_bits)
        results = runner.run(feeds)
        notes = [f"ran with the integer engine ({requant} requantization)"]
        if runner.float_nodes:
            notes.append(
                f"float fallback for {len(runner.float_nodes)} nodes: "
                + ", ".join(runner.float_nodes[:8])
            )
        overflowing = [o for o in runner.overflows() if o.overflows]
        notes += [
            f"{o.node}: {o.overflows} of {o.total} accumulations overflow {accumulator_bits} bits"
            for o in overflowing
        ]
    _write_npz(Path(output), results)
    return "\n".join([f"wrote {output}: {', '.join(results)}", *notes])


def _read_feeds(path: Path, names: list[str]) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise DataError(f"{path} does not exist; give an .npz with one array per model input")
    with np.load(path, allow_pickle=False) as archive:
        if len(names) == 1 and len(archive.files) == 1:
            return {names[0]: archive[archive.files[0]]}
        missing = [n for n in names if n not in archive.files]
        if missing:
            raise DataError(f"{path} lacks arrays for inputs {missing}; it has {archive.files}")
        return {n: archive[n] for n in names}


def _write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    if not path.parent.is_dir():
        raise DataError(f"output folder {path.parent} does not exist; create it first")
    handle, staged = tempfile.mkstemp(prefix=".qdq-", suffix=".npz", dir=path.parent)
    os.close(handle)
    try:
        np.savez(staged, **arrays)
        os.replace(staged, path)
    finally:
        if os.path.exists(staged):
            os.remove(staged)
