"""ONNX's recurrent ops as torch functions (LSTM), unrolled step by step over the sequence so
that autograd sees every gate."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from qdq.errors import ModelError
from qdq.qat.ops_args import Attrs, Value, input_or_none


def lstm(inputs: Sequence[Value], attrs: Attrs) -> tuple[torch.Tensor, ...]:
    """ONNX's LSTM (gates i, o, f, c; sequence first; peepholes optional), one or both
    directions. Not converted: custom activations, clipping, coupled input-forget gates,
    batch-first layout, and sequences of different lengths."""
    x, w, r = inputs[:3]
    bias, lengths, h0, c0, peep = (input_or_none(inputs, i) for i in range(3, 8))
    odd = [k for k in ("activations", "clip", "input_forget", "layout") if attrs.get(k)]
    if odd or (lengths is not None and bool((lengths != x.shape[0]).any())):
        raise ModelError(f"LSTM with {odd or 'sequences of different lengths'} has no converter")
    directions, hidden = w.shape[0], w.shape[1] // 4
    zeros = x.new_zeros(directions, x.shape[1], hidden)
    h0, c0 = (zeros if v is None else v for v in (h0, c0))
    ys, hs, cs = [], [], []
    for d in range(directions):
        reverse = attrs.get("direction", b"forward") == b"reverse" or d == 1
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
