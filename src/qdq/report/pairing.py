"""Which tensors of a quantized file are copies of the float model's, and where qdq's grids
start at a floor: read from the file's metadata (qdq's files) or its Q/DQ pairs (another
tool's), so that `qdq compare` measures each layer against its float twin."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping

import onnx

from qdq.errors import ModelError
from qdq.onnx.model import FLOORS_KEY, METADATA_KEY

WEIGHTS_ONLY = ("DynamicQuantizeLSTM",)  # int8 weights, no Q/DQ: `qdq.passes.recurrent`


def quantized_tensor_pairs(
    quantized: onnx.ModelProto, reference: onnx.ModelProto
) -> dict[str, str]:
    """{tensor in the float model: its dequantized copy in the quantized model}, and the
    outputs of the ops that run on int8 weights alone (WEIGHTS_ONLY), each paired with itself."""
    props = {p.key: p.value for p in quantized.metadata_props}
    if METADATA_KEY in props:
        pairs = _metadata_pairs(props[METADATA_KEY])
    else:  # a QDQ model from another tool: DequantizeLinear(QuantizeLinear(x)) copies x
        by_input = {n.input[0]: n for n in quantized.graph.node if n.op_type == "DequantizeLinear"}
        pairs = {
            n.input[0]: by_input[n.output[0]].output[0]
            for n in quantized.graph.node
            if n.op_type == "QuantizeLinear" and n.output[0] in by_input
        }
    # an op on int8 weights keeps its outputs' names and has no dequantized copy: its outputs
    # are measured as they are (an LSTM's, ddddocr's)
    runtime = (n for n in quantized.graph.node if n.op_type in WEIGHTS_ONLY)
    pairs |= {o: o for n in runtime for o in n.output if o}  # "": an output left out
    names = {o for n in reference.graph.node for o in n.output} | {
        i.name for i in reference.graph.input
    }
    produced = {o for n in quantized.graph.node for o in n.output}
    outputs = {o.name for o in reference.graph.output}
    return {f: q for f, q in pairs.items() if f in names and q in produced and f not in outputs}


def quantized_tensor_floors(
    quantized: onnx.ModelProto, pairs: Mapping[str, str]
) -> dict[str, float]:
    """{paired float tensor: its floor} where qdq started the tensor's grid at the point below
    which its only reader is flat (`qdq.plan.floor`): there the reader's output stays within
    half a code of its value at the floor (exactly, for HardSwish), so both models' values are
    measured from the floor, whatever grid the file now has (fine-tuning moves grids)."""
    text = {p.key: p.value for p in quantized.metadata_props}.get(FLOORS_KEY)
    if text is None:  # another tool's file, or qdq's from before the entry
        return {}
    try:
        floors = json.loads(text)
    except ValueError:
        floors = None
    if not isinstance(floors, dict) or not all(map(_finite_floor, floors.items())):
        raise ModelError(
            f"the quantized model's metadata entry {FLOORS_KEY!r} is not a JSON object of "
            "tensor names and finite numbers; remove the entry (the layers are then measured "
            "below their floors too)"
        )
    return {name: float(floor) for name, floor in floors.items() if name in pairs}


def _finite_floor(item: tuple[object, object]) -> bool:
    """A floors entry's (tensor name, number) pair: a finite int or float, not a bool."""
    name, floor = item
    if not isinstance(name, str) or isinstance(floor, bool) or not isinstance(floor, int | float):
        return False
    try:
        return math.isfinite(floor)
    except OverflowError:  # an integer of hundreds of digits
        return False


def _metadata_pairs(text: str) -> dict[str, str]:
    """The metadata entry qdq writes, checked: a JSON object of tensor names."""
    try:
        pairs = json.loads(text)
    except ValueError:
        pairs = None
    if not isinstance(pairs, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in pairs.items()
    ):
        raise ModelError(
            f"the quantized model's metadata entry {METADATA_KEY!r} is not a JSON object of "
            "tensor names; remove the entry (qdq then pairs tensors through Q/DQ nodes)"
        )
    return pairs
