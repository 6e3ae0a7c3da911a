"""Opset upgrades: ONNX's version converter, checked and mended where it changes what a node
computes (a user's model converted must compute what it did)."""

from __future__ import annotations

import logging

import numpy as np
import onnx
from onnx import helper, numpy_helper, version_converter

from qdq.onnx.graph import constant_tensors
from qdq.onnx.repair import check_model, declare_no_shape, empty_shapes

log = logging.getLogger(__name__)

PER_AXIS_OPSET = 13  # DequantizeLinear's `axis` (per-channel weights) needs opset 13


def default_opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def upgrade_opset(model: onnx.ModelProto, opset: int = PER_AXIS_OPSET) -> onnx.ModelProto:
    """The model at `opset` or newer (13: per-axis DequantizeLinear), or unchanged if
    conversion fails."""
    if default_opset(model) >= opset:
        return model
    try:
        upgraded = converted(model, opset)
    except Exception as error:  # the converter raises bare RuntimeErrors and others
        log.warning("could not upgrade opset %d to %d (%s)", default_opset(model), opset, error)
        return model
    return upgraded


def converted(model: onnx.ModelProto, opset: int) -> onnx.ModelProto:
    """ONNX's version converter, mended where it changes what a node computes: an Upsample,
    or a Resize before opset 11, becomes a Resize with opset 11's defaults (half-pixel
    centres, nearest rounding half down), where the old ops map each output pixel back by
    `x / scale` and, nearest, take the floor (ONNX Runtime: the ceiling where it shrinks); a
    Hardmax before opset 13, which flattens its input from `axis` on, keeps its axis and means
    another one (refused: nothing here rewrites it)."""
    source = default_opset(model)
    if source < 13 <= opset and any(n.op_type == "Hardmax" for n in model.graph.node):
        raise ValueError(
            "a Hardmax before opset 13 takes its input flattened from `axis` on; the version "
            "converter keeps the axis, which then means another one"
        )
    rounding = _old_resizes(model) if source < 11 <= opset else {}
    with empty_shapes(model) as unshaped:  # the converter, as ONNX's checker, wants shapes
        upgraded = version_converter.convert_version(model, opset)
    declare_no_shape(upgraded, unshaped)
    for node in upgraded.graph.node:
        if node.op_type == "Resize" and node.output[0] in rounding:
            node.attribute.extend([
                helper.make_attribute("coordinate_transformation_mode", "asymmetric"),
                helper.make_attribute("nearest_mode", rounding[node.output[0]]),
            ])  # fmt: skip
    check_model(upgraded)
    return upgraded


def _old_resizes(model: onnx.ModelProto) -> dict[str, str]:
    """Each Upsample's and opset-10 Resize's output, and how its nearest pixels round."""
    constants = constant_tensors(model.graph)
    rounding = {}
    for node in (n for n in model.graph.node if n.op_type in ("Upsample", "Resize")):
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if attrs.get("mode", b"nearest") != b"nearest":
            rounding[node.output[0]] = "floor"  # read by nearest modes only
            continue
        if "scales" in attrs:
            scales = np.asarray(attrs["scales"])
        elif len(node.input) > 1 and node.input[1] in constants:
            scales = numpy_helper.to_array(constants[node.input[1]])
        else:  # computed in the graph: an Upsample grows (its scales are at least 1)
            scales = np.ones(1)
        resized = scales[scales != 1]
        if (resized < 1).any() and (resized > 1).any():
            raise ValueError(
                f"{node.op_type} {node.name!r}: nearest, grows one axis and shrinks another"
            )
        rounding[node.output[0]] = "ceil" if (resized < 1).any() else "floor"
    return rounding
