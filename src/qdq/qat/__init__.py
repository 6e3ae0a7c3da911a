"""Quantization-aware training (needs the torch extra: pip install 'qdq[torch]').

`prepare(module, example_inputs, config, calibration)` returns a copy of a torch module with
fake quantization where `qdq quantize` would put Q/DQ pairs; train it with your own loop, then
`export(prepared, path, example_inputs)` writes the same QDQ ONNX format (docs/qat.md).
"""

from qdq.errors import UsageError

try:
    import torch  # noqa: F401
except ImportError:
    raise UsageError("qdq.qat needs PyTorch; install the extra: pip install 'qdq[torch]'") from None

from qdq.qat.export import export
from qdq.qat.prepare import freeze_batchnorm, prepare

__all__ = ["export", "freeze_batchnorm", "prepare"]
