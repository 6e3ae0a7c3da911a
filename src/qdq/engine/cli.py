"""`qdq run`: feed an .npz through a model and write the outputs to an .npz, atomically."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from qdq.arrayfile import read_arrays
from qdq.data import InputSpec, check_feeds, model_inputs
from qdq.engine.executor import Engine
from qdq.errors import ModelError, UsageError
from qdq.onnx.model import check_outputs_readable, load_model
from qdq.onnx.sessions import Use, fails_on_data, open_session
from qdq.outputs import check_output, staged


def run_command(
    model_path: str,
    inputs: str,
    output: str,
    engine: str,
    requant: str,
    accumulator_bits: int,
    kernels: str = "auto",
) -> str:
    target = check_output(output, [model_path, inputs])
    if target.suffix != ".npz":  # a .npy name held a zip that np.load reads as npz
        raise UsageError(
            f"-o {output}: run writes an .npz archive, an array per output; name it .npz"
        )
    model = load_model(model_path)
    check_outputs_readable(model, model_path)
    specs = model_inputs(model)
    feeds, unused = _read_feeds(Path(inputs), specs)
    session = _checked_session(model, model_path)
    if engine == "ort":
        names = [o.name for o in session.get_outputs()]
        with fails_on_data(f"{model_path} on {inputs}"):
            results = dict(zip(names, session.run(names, feeds), strict=True))
        notes = ["ran with ONNX Runtime"]
    else:
        runner = Engine(model, requant, accumulator_bits, kernels)
        try:
            results = runner.run(feeds)
        except Exception:
            # the data's fault only if the model itself fails on it in ONNX Runtime: then that
            # says why; else the engine's own error stands
            with fails_on_data(f"{model_path} on {inputs}"):
                session.run(None, feeds)
            raise
        notes = [
            f"ran with the integer engine ({requant} requantization, {runner.kernels} kernels)"
        ]
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
    # strings as unicode arrays: an object array would be written as a pickle, which no
    # reader of untrusted files (qdq's own included) loads
    results = {
        k: v.astype(str) if isinstance(v, np.ndarray) and v.dtype == object else v
        for k, v in results.items()
    }
    with staged(target) as temporary, zipfile.ZipFile(temporary, "w") as archive:
        for name, array in results.items():  # not savez: an output may be named "file"
            with archive.open(f"{name}.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array(member, np.asanyarray(array), allow_pickle=False)
    if unused:
        notes.append(f"{inputs}: arrays {unused} feed no model input; not read")
    return "\n".join([f"wrote {output}: {', '.join(results)}", *notes])


def _read_feeds(path: Path, specs: list[InputSpec]) -> tuple[dict[str, np.ndarray], list[str]]:
    """One array per input from an .npz (or an .npy for a single-input model), checked
    against the model's declared dtypes and shapes; and the arrays no input takes (named in a
    note, as the other commands name them: a misspelt input had gone unsaid)."""
    arrays = read_arrays(path)
    if len(specs) == 1 and len(arrays) == 1:
        arrays = {specs[0].name: next(iter(arrays.values()))}
    check_feeds(arrays, specs, str(path))
    wanted = {s.name for s in specs}
    return {s.name: arrays[s.name] for s in specs}, [k for k in arrays if k not in wanted]


def _checked_session(model: onnx.ModelProto, path: str) -> ort.InferenceSession:
    """ONNX Runtime's session of the model: the engine falls back on it op by op, so a model
    it refuses (a custom-domain op, say) runs on neither."""
    try:
        return open_session(model, Use.PLAIN)
    except Exception as error:  # ONNX Runtime raises its own exception types
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ModelError(
            f"{path}: ONNX Runtime cannot load it ({first}); qdq runs models ONNX Runtime "
            "can run, so replace or remove the ops it names"
        ) from None
