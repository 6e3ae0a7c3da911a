"""Checks of a model file's fields that ONNX's checker lets through and that would fail deep
inside a pass: strings in broken UTF-8, tensors of no known type."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import onnx
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from qdq.errors import ModelError

_KNOWN_TYPES = set(onnx.TensorProto.DataType.values()) - {onnx.TensorProto.UNDEFINED}


def check_fields(model: onnx.ModelProto, tensors: Iterable[onnx.TensorProto], path: Path) -> None:
    """Refuse a string field holding broken UTF-8 anywhere in `model` (protobuf hands such a
    field over as bytes, which names, metadata and doc strings are never used as), and any of
    `tensors` (every tensor the model stores) of a type ONNX does not define."""
    broken = _broken_string(model, "model")
    if broken:
        raise ModelError(f"{path} is not a valid ONNX model: its {broken} is in broken UTF-8")
    for tensor in tensors:
        if tensor.data_type not in _KNOWN_TYPES and tensor.ByteSize():  # not an unset field
            raise ModelError(
                f"{path} is not a valid ONNX model: tensor {tensor.name!r} has data type "
                f"{tensor.data_type}, which ONNX does not define; export the model again"
            )


def _broken_string(message: Message, where: str) -> str | None:
    """The field path of the first string field in `message` that holds bytes, if any."""
    for field, value in message.ListFields():
        here = f"{where}.{field.name}"
        items = [value] if isinstance(value, str | bytes | Message) else value  # or repeated
        if field.type == FieldDescriptor.TYPE_STRING:
            if any(isinstance(v, bytes) for v in items):
                return here
        elif field.type == FieldDescriptor.TYPE_MESSAGE:
            for item in items:
                found = _broken_string(item, here)
                if found:
                    return found
    return None
