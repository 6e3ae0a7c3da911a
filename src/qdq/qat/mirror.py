"""Which torch pieces mirror the ONNX graph qdq plans on: the fx nodes that compute each of
its tensors, and the torch layer whose weight an ONNX node holds (`prepare` installs fake
quantization through them, `export` reads the learned grids back through them)."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import onnx
from torch import fx, nn

from qdq.onnx.graph import GraphIndex, attributes
from qdq.qat.layers import QuantizedLayer


def called_module(graph_module: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    """The module a `call_module` node calls; None for any other node."""
    return graph_module.get_submodule(node.target) if node.op == "call_module" else None


def nodes_by_tensor(
    graph_module: fx.GraphModule, labels: Mapping[str, str], index: GraphIndex
) -> dict[str, list[str]]:
    """Per tensor of the planned graph, the fx nodes that compute it in graph order: a layer
    and the Dropout or Identity after it are one tensor to ONNX, and each gets the tensor's
    fake quantization (a second on the same grid changes nothing), so that a reader of
    either trains on what the file feeds it (readers of the first had trained on float)."""
    present = index.producer.keys() | index.graph_inputs
    by_tensor: dict[str, list[str]] = {}
    for node in graph_module.graph.nodes:
        tensor = labels.get(node.name)
        if tensor in present:
            by_tensor.setdefault(tensor, []).append(node.name)
    return by_tensor


def layer_of(
    graph_module: fx.GraphModule,
    node: onnx.NodeProto,
    nodes: Mapping[str, list[str]],
    index: GraphIndex,
) -> QuantizedLayer | None:
    """The QuantizedLayer whose fx node computes `node`'s output, if one does: for a MatMul,
    the output of the bias Add after it (torch writes a Linear on more than two axes so)."""
    fx_nodes = {n.name: n for n in graph_module.graph.nodes}
    out = node.output[0]
    add = index.sole_consumer(out)
    if node.op_type == "MatMul" and out not in nodes and add is not None and add.op_type == "Add":
        out = add.output[0]
    for fx_name in nodes.get(out, []):
        called = called_module(graph_module, fx_nodes[fx_name])
        if isinstance(called, QuantizedLayer):
            return called
    return None


def same_weight(values: np.ndarray, layer: QuantizedLayer, node: onnx.NodeProto) -> bool:
    """Whether ONNX node `node`'s weight `values` holds the layer's folded weight, so that
    codes made in torch are the file's."""
    w = onnx_layout(node, layer.folded()[0].detach().cpu().numpy())
    return w.shape == values.shape and bool(np.allclose(w, values, rtol=1e-5, atol=1e-7))


def onnx_layout(node: onnx.NodeProto, weight: np.ndarray) -> np.ndarray:
    """A torch layer's weight (outputs first) as ONNX node `node` holds it: transposed for a
    MatMul and a Gemm without transB (by the op, not by the shape: a square one is either)."""
    transposed = node.op_type == "MatMul" or (
        node.op_type == "Gemm" and not attributes(node).get("transB", 0)
    )
    return weight.T if transposed else weight
