"""SwiGLU feed-forward: W3(silu(W1 x) * W2 x), weights as nn.Linear stores them (out, in).

Backends:
- reference: three GEMMs and the elementwise silu and product, as the published block does.
- fused: W1 and W2 as one GEMM over their concatenated weights (x is read once, one launch
  instead of two), then silu(a) * b in one autograd node that saves only the GEMM's output (not
  silu(a) and the product as well), then W3. The weights stay two parameters, so the published
  state dict is unchanged; the concatenation copies 2 * hidden * d weights per step, small
  beside the (tokens, 2 * hidden) activations it replaces.
- triton: the fused backend with silu(a) * b as one Triton kernel (kernels/swiglu.py) forward
  and one backward, saving only the GEMM output; under autocast it computes in float32 and
  writes bf16 once. Automatic where Triton runs (a CUDA device).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..availability import triton_available_reasons, triton_device_reasons
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
    return F.linear(silu_mul(_w12(x, w1, w2, b1, b2)), w3, b3)


def _w12(x, w1, w2, b1, b2):
    """[W1 x, W2 x] (..., 2 * hidden) as one GEMM over the concatenated weights."""
    if w1.shape != w2.shape:
        raise ValueError(f"swiglu: w1 and w2 must have the same shape, got {tuple(w1.shape)} and {tuple(w2.shape)}")
    b12 = None if b1 is None else torch.cat([b1, b2])
    return F.linear(x, torch.cat([w1, w2]), b12)


# ---------------------------------------------------------------- Triton
def triton_kernels():
    from microdit.kernels import swiglu as kernels  # imports triton: only when used

    return kernels


@torch.library.custom_op("microdit::triton_silu_mul", mutates_args=())
def silu_mul_triton_op(h: torch.Tensor) -> torch.Tensor:
    return triton_kernels().silu_mul_fwd(h.contiguous())


@silu_mul_triton_op.register_fake
def _(h):
    return h.new_empty(h.shape[0], h.shape[1] // 2)


@torch.library.custom_op("microdit::triton_silu_mul_backward", mutates_args=())
def silu_mul_triton_backward(dout: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    return triton_kernels().silu_mul_bwd(dout.contiguous(), h.contiguous())


@silu_mul_triton_backward.register_fake
def _(dout, h):
    return torch.empty_like(h)


def _silu_mul_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])


def _silu_mul_backward(ctx, dout):
    (h,) = ctx.saved_tensors
    return silu_mul_triton_backward(dout, h)


silu_mul_triton_op.register_autograd(_silu_mul_backward, setup_context=_silu_mul_setup)


def triton_supports(x, *args, **kwargs) -> list[str]:
    return triton_device_reasons(x.device.type)


@swiglu_op.register("triton", priority=20, available=triton_available_reasons, supports=triton_supports)
def swiglu_triton(x, w1, w2, w3, b1=None, b2=None, b3=None):
    """The fused backend with silu * mul as one Triton kernel forward and one backward."""
    h = _w12(x, w1, w2, b1, b2)  # (..., 2 * hidden)
    mid = silu_mul_triton_op(h.reshape(-1, h.shape[-1])).view(*h.shape[:-1], -1)  # (..., hidden)
    return F.linear(mid, w3, b3)


def swiglu(x, w1, w2, w3, b1=None, b2=None, b3=None, backend=None):
    """(..., d) -> (..., d)."""
    return swiglu_op(x, w1, w2, w3, b1, b2, b3, backend=backend)
