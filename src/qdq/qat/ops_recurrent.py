"""ONNX's recurrent ops as torch functions (LSTM, GRU), unrolled step by step over the sequence
so that autograd sees every gate."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from qdq.errors import ModelError
from qdq.qat.ops_args import Attrs, Value, input_or_none


def _plain(op: str, inputs: Sequence[Value], attrs: Attrs) -> None:
    """Refuse what the converters leave out: custom activations, clipping, coupled gates,
    batch-first layout, and sequences of different lengths."""
    x, lengths = inputs[0], input_or_none(inputs, 4)
    odd = [k for k in ("activations", "clip", "input_forget", "layout") if attrs.get(k)]
    if odd or (lengths is not None and bool((lengths != x.shape[0]).any())):
        raise ModelError(f"{op} with {odd or 'sequences of different lengths'} has no converter")


def _reversed(attrs: Attrs, direction: int) -> bool:
    return attrs.get("direction", b"forward") == b"reverse" or direction == 1


def lstm(inputs: Sequence[Value], attrs: Attrs) -> tuple[torch.Tensor, ...]:
    """ONNX's LSTM (gates i, o, f, c; sequence first; peepholes optional), one or both
    directions."""
    _plain("LSTM", inputs, attrs)
    x, w, r = inputs[:3]
    bias, h0, c0, peep = (input_or_none(inputs, i) for i in (3, 5, 6, 7))
    directions, hidden = w.shape[0], w.shape[1] // 4
    zeros = x.new_zeros(directions, x.shape[1], hidden)
    h0, c0 = (zeros if v is None else v for v in (h0, c0))
    ys, hs, cs = [], [], []
    for d in range(directions):
        reverse = _reversed(attrs, d)
        b = bias[d, : 4 * hidden] + bias[d, 4 * hidden :] if bias is not None else 0
        p = peep[d].split(hidden) if peep is not None else (0, 0, 0)
        h, c, out = h0[d], c0[d], []
        for t in reversed(range(x.shape[0])) if reverse else range(x.shape[0]):
            i, o, f, g = (x[t] @ w[d].T + h @ r[d].T + b).split(hidden, -1)
            i, f = torch.sigmoid(i + p[0] * c), torch.sigmoid(f + p[2] * c)
            c = f * c + i * torch.tanh(g)
            h = torch.sigmoid(o + p[1] * c) * torch.tanh(c)
            out.append(h)
        ys.append(torch.stack(out[::-1] if reverse else out))
        hs.append(h)
        cs.append(c)
    return torch.stack(ys, 1), torch.stack(hs), torch.stack(cs)


def gru(inputs: Sequence[Value], attrs: Attrs) -> tuple[torch.Tensor, ...]:
    """ONNX's GRU (gates z, r, h; sequence first), one or both directions, the reset gate
    applied before the recurrent product or, with `linear_before_reset` (PyTorch's exports),
    after it."""
    _plain("GRU", inputs, attrs)
    x, w, r = inputs[:3]
    bias, h0 = input_or_none(inputs, 3), input_or_none(inputs, 5)
    directions, hidden = w.shape[0], w.shape[1] // 3
    after = bool(attrs.get("linear_before_reset", 0))
    h0 = x.new_zeros(directions, x.shape[1], hidden) if h0 is None else h0
    ys, hs = [], []
    for d in range(directions):
        reverse = _reversed(attrs, d)
        wb, rb = bias[d].split(3 * hidden) if bias is not None else (x.new_zeros(3 * hidden),) * 2
        rz, rr, rh = r[d].split(hidden)
        bz, br, bh = rb.split(hidden)
        h, out = h0[d], []
        for t in reversed(range(x.shape[0])) if reverse else range(x.shape[0]):
            xz, xr, xh = (x[t] @ w[d].T + wb).split(hidden, -1)
            z = torch.sigmoid(xz + h @ rz.T + bz)
            reset = torch.sigmoid(xr + h @ rr.T + br)
            kept = reset * (h @ rh.T + bh) if after else (reset * h) @ rh.T + bh
            h = (1 - z) * torch.tanh(xh + kept) + z * h
            out.append(h)
        ys.append(torch.stack(out[::-1] if reverse else out))
        hs.append(h)
    return torch.stack(ys, 1), torch.stack(hs)


def dynamic_quantize_lstm(inputs: Sequence[Value], attrs: Attrs) -> tuple[torch.Tensor, ...]:
    """ONNX Runtime's DynamicQuantizeLSTM (an LSTM of qdq's with int8 weights:
    `qdq.passes.recurrent`): the weights dequantized and held as they are, the LSTM run in
    float. The op's rounding of its input and hidden state as it runs is not simulated."""
    w, r = (_dequantized(inputs[i], *inputs[s : s + 2]) for i, s in ((1, 8), (2, 10)))
    return lstm([inputs[0], w, r, *inputs[3:8]], attrs)


def _dequantized(codes: Value, scale: Value, zero_point: Value) -> torch.Tensor:
    """(directions, columns, rows) int8 codes as the float (directions, rows, columns) weight
    ONNX's LSTM takes; one scale and zero point per direction, or per direction and row."""
    scale, zero_point = (v.reshape(v.shape[0], 1, -1) for v in (scale, zero_point))
    return ((codes.float() - zero_point.float()) * scale.float()).transpose(1, 2)
