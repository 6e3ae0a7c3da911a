"""The tools bench/peers.py compares, as a user runs them: which configurations each runs on a
model, the command line for each (qdq's CLI, `peers.py --ort`, the peers' wrappers in
../shared/peers), and ONNX Runtime's quantize_static as its docs and issues recommend, which that
`--ort` mode runs in a fresh process like every other tool."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from ptq import quantize_static_qdq
from unseen import feeds, unbatched

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SHARED = ROOT.parent / "shared" / "peers"
PEERS = Path(__file__).with_name("peers.py")  # the script whose --ort mode runs ort_quantize
# per tool: its default first, then its accuracy recipes (../shared/peers/README.md)
PEER_CONFIGS = {
    "quark": ["default", "u8s8_percentile", "a8w8_pc", "sq"],
    "aimet": ["default", "tf_enhanced", "best"],
    "inc": ["default", "percentile", "sq"],
    "modelopt": ["default", "max"],
}
SMOOTHQUANT = {"quark": "sq", "inc": "sq"}  # configs run only on models without Conv
TOOLS = ["qdq", "ort", *PEER_CONFIGS]
ENTROPY_MODELS = {"cnn", "nudenet", "ddddocr"}


def op_types(model: Path) -> set[str]:
    return {node.op_type for node in onnx.load(str(model), load_external_data=False).graph.node}


def configs(tool: str, name: str, model: Path) -> list[str]:
    ops = op_types(model)
    if tool == "qdq":
        return ["default"]
    if tool == "ort":
        # Conv+MatMul for networks with convolutions, MatMul alone for transformers and for
        # networks with both (a recognizer's attention neck: the restriction users try first).
        restricted = ["conv_matmul"] if "Conv" in ops else []
        restricted += ["matmul"] if "MatMul" in ops or not restricted else []
        methods = ["minmax", "percentile"]
        # Entropy: quantize_static builds its calibrator with 128 bins and 128 quantized bins
        # (extra_options cannot change them), which leaves one candidate threshold, the full
        # range: MinMax's model, after minutes of histograms. On ENTROPY_MODELS only, to show it.
        entropy = ["entropy"] if name in ENTROPY_MODELS else []
        return methods + entropy + [f"{m}_{r}" for r in restricted for m in methods]
    return [c for c in PEER_CONFIGS[tool] if c != SMOOTHQUANT.get(tool) or "Conv" not in ops]


def command(tool: str, config: str, source: Path, out: Path, calib: Path, peers: Path) -> list[str]:
    """The command line a user would type for `tool` with `config`."""
    if tool == "qdq":
        return [
            str(Path(sys.executable).parent / "qdq"),
            "quantize",
            str(source),
            "-o",
            str(out),
            "--calib",
            str(calib),
        ]
    if tool == "ort":
        return [sys.executable, str(PEERS), "--ort", str(source), str(out), str(calib), config]
    batch = [] if ort_fixed_batch(source) else ["--calib-batch", "16"]
    return [
        str(peers / tool / "bin" / "python"),
        str(SHARED / f"{tool}_quantize.py"),
        str(source),
        str(out),
        str(calib),
        "--config",
        config,
        *batch,
    ]


def ort_fixed_batch(source: Path) -> bool:
    """Whether samples go one at a time: an axis fixed at 1, or an input not batched (a scalar,
    Silero's state whose leading axis is 2)."""
    session = ort.InferenceSession(str(source), providers=["CPUExecutionProvider"])
    return any(unbatched(i) or i.shape[0] == 1 for i in session.get_inputs())


def ort_quantize(source: Path, out: Path, calib: Path, config: str) -> None:
    """quantize_static as recommended: opset >= 13, quant_pre_process, QDQ, u8 activations, s8
    per-channel weights; `config` = method[_conv_matmul | _matmul] (op_types_to_quantize)."""
    from onnxruntime.quantization import CalibrationDataReader

    method, _, restricted = config.partition("_")
    only = {"conv_matmul": ["Conv", "MatMul"], "matmul": ["MatMul"], "": None}[restricted]
    with np.load(calib) as saved:
        data = {k: saved[k] for k in saved.files}
    count, step, take = feeds(source, data)  # inputs not batched (Silero's sr, state) whole

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.starts = iter(range(0, count, step))

        def get_next(self) -> dict[str, np.ndarray] | None:
            i = next(self.starts, None)
            return None if i is None else take(i)

    with tempfile.TemporaryDirectory() as tmp:
        model = onnx.load(str(source))
        opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
        upgraded = Path(tmp) / "opset13.onnx"
        if opset < 13:
            model = onnx.version_converter.convert_version(model, 13)
        onnx.save(model, str(upgraded))
        quantize_static_qdq(
            upgraded,
            out,
            Reader(),
            {"minmax": "MinMax", "percentile": "Percentile", "entropy": "Entropy"}[method],
            per_channel=True,
            op_types=only,
            # it otherwise keeps every batch's activations until the end: 10+ GB on the layout
            # model; MinMax's ranges are the same either way. Not a divisor of the batch count:
            # when the last flush empties the buffer ORT 1.32 raises "No data is collected"
            extra_options={"CalibMaxIntermediateOutputs": 15},
        )
