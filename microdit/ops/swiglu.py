"""SwiGLU feed-forward: W3(silu(W1 x) * W2 x), weights as nn.Linear stores them (out, in).

Backends:
- reference: three GEMMs and the elementwise silu and product, as the published block does.
- fused: W1 and W2 as one GEMM over their concatenated weights (x is read once, one launch
  instead of two), then silu(a) * b in one autograd node that saves only the GEMM's output (not
  silu(a) and the product as well), then W3. The weights stay two parameters, so the published
  state dict is unchanged; the concatenation copies 2 * hidden * d weights per step, small
  beside the (tokens, 2 * hidden) activations it replaces.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .registry import Op

swiglu_op = Op("swiglu", "W3(silu(W1 x) * W2 x)")


@swiglu_op.register("reference", priority=0)
def swiglu_reference(x, w1, w2, w3, b1=None, b2=None, b3=None):
    return F.linear(F.silu(F.linear(x, w1, b1)) * F.linear(x, w2, b2), w3, b3)


def silu_mul_reference(h):
    a, b = h.chunk(2, dim=-1)
    return F.silu(a) * b


class _SiluMul(torch.autograd.Function):
    """silu(a) * b of h = [a, b] (last dim), saving only h."""

    @staticmethod
    def forward(ctx, h):
        ctx.save_for_backward(h)
        return silu_mul_reference(h)

    @staticmethod
    def backward(ctx, dout):
        (h,) = ctx.saved_tensors
        a, b = h.chunk(2, dim=-1)
        s = torch.sigmoid(a)
        da = dout * b * s * (1 + a * (1 - s))  # d silu(a) = s (1 + a (1 - s))
        return torch.cat([da, dout * a * s], dim=-1)


def silu_mul(h):
    """(..., 2 * hidden) -> (..., hidden): silu(first half) * second half."""
    if h.shape[-1] % 2:
        raise ValueError(f"silu_mul: the last dim of h must be even (a and b halves), got {h.shape[-1]}")
    return _SiluMul.apply(h)


@swiglu_op.register("fused", priority=10)
def swiglu_fused(x, w1, w2, w3, b1=None, b2=None, b3=None):
    """One GEMM for W1 and W2, fused silu * mul, then W3."""
    if w1.shape != w2.shape:
        raise ValueError(f"swiglu: w1 and w2 must have the same shape, got {tuple(w1.shape)} and {tuple(w2.shape)}")
    b12 = None if b1 is None else torch.cat([b1, b2])
    h = F.linear(x, torch.cat([w1, w2]), b12)  # (..., 2 * hidden)
    return F.linear(silu_mul(h), w3, b3)


def swiglu(x, w1, w2, w3, b1=None, b2=None, b3=None, backend=None):
    """(..., d) -> (..., d)."""
    return swiglu_op(x, w1, w2, w3, b1, b2, b3, backend=backend)
