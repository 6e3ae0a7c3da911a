"""AdaRound (Nagel et al. 2020): learn, weight by weight, whether to round up or down.

Nearest rounding minimizes each weight's own error, not the layer's output error. AdaRound
relaxes each choice to `h(V) in [0, 1]` (a rectified sigmoid), minimizes
`|| W x - W~ x~ ||^2 + lambda * sum(1 - |2 h(V) - 1|^beta)` layer by layer on calibration inputs,
annealing beta from 20 to 2 so that every h ends at 0 or 1, and keeps the learned codes. `x~`
is the layer's input on its own quantization grid, as the integer model will see it.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx

from qdq.affine import fake_quantize
from qdq.errors import SchemeError
from qdq.onnx.conv import ConvGeometry
from qdq.onnx.graph import GraphIndex, attributes
from qdq.onnx.sessions import session_with_outputs
from qdq.plan.build import Plan
from qdq.scheme import PerChannel

log = logging.getLogger(__name__)

ZETA, GAMMA = 1.1, -0.1  # stretch of the rectified sigmoid (the paper's values)
REGULARIZATION = 0.01
BETA = (20.0, 2.0)
WARMUP = 0.2  # share of iterations with reconstruction only
SAMPLES = 32  # calibration samples whose layer inputs are kept


def learn_rounding(
    model: onnx.ModelProto,
    index: GraphIndex,
    plan: Plan,
    feeds: list[dict[str, np.ndarray]],
    iterations: int = 500,
) -> dict[tuple[str, int], np.ndarray]:
    """Learned integer codes for the weight of every quantized 2-D Conv and Gemm."""
    torch = _torch()
    torch.manual_seed(0)
    layers = [
        n
        for n in index.nodes
        if n.op_type in ("Conv", "Gemm")
        and (n.name, 1) in plan.constants
        and n.input[0] in plan.activations
    ]
    inputs = _layer_inputs(model, [n.input[0] for n in layers], feeds)
    codes = {}
    for node in layers:
        x = inputs[node.input[0]]
        if node.op_type == "Conv" and x.ndim != 4:
            continue
        codes[node.name, 1] = _learn_layer(torch, node, index, plan, x, iterations)
        log.info("AdaRound: %s", node.name)
    return codes


def _torch():
    try:
        import torch
    except ImportError:
        raise SchemeError(
            "AdaRound needs PyTorch; install the extra: pip install 'qdq[torch]'"
        ) from None
    return torch


def _layer_inputs(
    model: onnx.ModelProto, names: list[str], feeds: list[dict[str, np.ndarray]]
) -> dict[str, np.ndarray]:
    session = session_with_outputs(model, names)
    batches = [session.run(names, feed) for feed in feeds]
    return {n: np.concatenate([b[i] for b in batches])[:SAMPLES] for i, n in enumerate(names)}


def _learn_layer(torch, node, index: GraphIndex, plan: Plan, x: np.ndarray, iterations: int):
    qparams = plan.constants[node.name, 1]
    weight = index.constant(node.input[1])
    scale = qparams.scale.astype(np.float32)
    zero_point = np.asarray(qparams.zero_point, np.float32)
    granularity = qparams.scheme.granularity
    if isinstance(granularity, PerChannel):
        view = [1] * weight.ndim
        view[granularity.axis] = -1
        scale, zero_point = scale.reshape(view), zero_point.reshape(view)
    qmin, qmax = qparams.scheme.qmin, qparams.scheme.qmax
    w = torch.from_numpy(weight.astype(np.float32))
    s = torch.from_numpy(np.asarray(scale, np.float32))
    zp = torch.from_numpy(zero_point)  # codes are stored with it: w = s * (code - zp)
    floor = torch.floor(w / s)
    rest = (w / s - floor).clamp(1e-4, 1 - 1e-4)
    v = torch.nn.Parameter(-torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1))
    layer = _layer_op(torch, node, index, x.shape)
    x_float = torch.from_numpy(x.astype(np.float32))
    x_quant = torch.from_numpy(fake_quantize(x, plan.activations[node.input[0]]))
    with torch.no_grad():
        target = layer(x_float, w)
    optimizer = torch.optim.Adam([v], lr=1e-2)

    def soft(v):
        return (torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA).clamp(0, 1)

    warm = int(WARMUP * iterations)
    for step in range(iterations):
        pick = torch.randint(0, len(x_float), (min(8, len(x_float)),))
        w_soft = s * ((floor + zp + soft(v)).clamp(qmin, qmax) - zp)
        loss = ((layer(x_quant[pick], w_soft) - target[pick]) ** 2).mean()
        if step >= warm:
            progress = (step - warm) / max(1, iterations - warm)
            beta = BETA[1] + (BETA[0] - BETA[1]) * (1 - progress)
            h = soft(v)
            loss = loss + REGULARIZATION * (1 - (2 * h - 1).abs().pow(beta)).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        hard = (floor + zp + (soft(v) >= 0.5).float()).clamp(qmin, qmax)
    return hard.numpy().astype(qparams.scheme.storage_dtype)


def _layer_op(torch, node: onnx.NodeProto, index: GraphIndex, x_shape: tuple[int, ...]):
    """The layer's linear map (no bias) as a torch function of (input, weight)."""
    functional = torch.nn.functional
    attrs = attributes(node)
    if node.op_type == "Gemm":
        if attrs.get("transB", 0):
            return lambda x, w: x @ w.T
        return lambda x, w: x @ w
    weight_shape = index.constant(node.input[1]).shape
    g = ConvGeometry.from_attributes(attrs, x_shape, weight_shape)
    top, left, bottom, right = g.pads

    def conv(x, w):
        padded = functional.pad(x, (left, right, top, bottom))
        return functional.conv2d(padded, w, stride=g.strides, dilation=g.dilations, groups=g.group)

    return conv
