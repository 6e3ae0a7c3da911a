"""qdq: quantize floating-point neural networks to integers.

The core, bottom up: a `QScheme` says what the integer grid looks like; an observer streams
data into a `Range`; `choose_qparams` turns the two into a `QParams`; `quantize`, `dequantize`
and `fake_quantize` apply it (`grid_codes` puts weights on a binary, ternary or power-of-two
`WeightGrid` instead); `qdq.fixedpoint` requantizes int32 accumulators with integers only.
"""

from qdq.affine import dequantize, fake_quantize, quantize
from qdq.errors import (
    ArgumentError,
    DataError,
    ObserverStateError,
    QdqError,
    RangeError,
    SchemeError,
)
from qdq.lowbit import WeightGrid, grid_codes
from qdq.observers import (
    KL,
    METHODS,
    MSE,
    HistogramObserver,
    MinMaxObserver,
    MovingAverageMinMaxObserver,
    Observer,
    Percentile,
    make_observer,
)
from qdq.qparams import QParams, Range, choose_qparams
from qdq.scheme import PRESETS, PerBlock, PerChannel, PerTensor, QScheme, Rounding, preset

__version__ = "0.1.0"

__all__ = [
    "KL",
    "METHODS",
    "MSE",
    "PRESETS",
    "ArgumentError",
    "DataError",
    "HistogramObserver",
    "MinMaxObserver",
    "MovingAverageMinMaxObserver",
    "Observer",
    "ObserverStateError",
    "PerBlock",
    "PerChannel",
    "PerTensor",
    "Percentile",
    "QParams",
    "QScheme",
    "QdqError",
    "Range",
    "RangeError",
    "Rounding",
    "SchemeError",
    "WeightGrid",
    "choose_qparams",
    "dequantize",
    "fake_quantize",
    "grid_codes",
    "make_observer",
    "preset",
    "quantize",
]
