"""Gated residual fused with the next LayerNorm + modulate: h = x + gate * branch, then
y = LN(h) * w * (1 + scale) + shift. Returns (h, y): h carries the residual stream on, y feeds
the next sub-layer. Within a block: the self-attention output into norm2 (gate1; no modulation,
shift = scale = 0) and the cross-attention output into norm3 + modulate (gate = 1).

Backends: reference (the published ops one after the other), torch (the residual add, then the
ln_modulate torch node) and triton (one kernel writes h and y; the backward is the ln_modulate
kernel plus the residual's elementwise gradient). As for ln_modulate, the automatic choice
is triton where it runs, else reference (the torch backend is slower in eager mode on a CPU).
"""
from __future__ import annotations

import torch

from ..availability import triton_available_reasons
from .ln_modulate import (
    _out_dtype,
    check_inputs,
    ln_modulate_reference,
    ln_modulate_torch,
    ln_modulate_triton_backward,
    triton_kernels,
    triton_supports,
)
from .registry import Op

residual_ln_modulate_op = Op("residual_ln_modulate", "h = x + gate * branch; (h, LayerNorm(h) * w * (1 + scale) + shift)")


def gated(x, branch, gate):
    return x + branch if gate is None else x + gate.unsqueeze(1) * branch


@residual_ln_modulate_op.register("reference", priority=0)
def residual_ln_modulate_reference(x, branch, gate, weight, shift, scale, eps):
    h = gated(x, branch, gate)  # (B, N, D)
    return h, ln_modulate_reference(h, weight, shift, scale, eps)


@residual_ln_modulate_op.register("torch", priority=-5)
def residual_ln_modulate_torch(x, branch, gate, weight, shift, scale, eps):
    h = gated(x, branch, gate)  # (B, N, D)
    return h, ln_modulate_torch(h, weight, shift, scale, eps)


@torch.library.custom_op("microdit::triton_residual_ln_modulate", mutates_args=())
def residual_triton_op(x: torch.Tensor, branch: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor | None,
                       shift: torch.Tensor, scale: torch.Tensor, eps: float,
                       out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return triton_kernels().ln_modulate_fwd(x.contiguous(), weight, shift.contiguous(), scale.contiguous(), eps,
                                            out_dtype, branch=branch.contiguous(), gate=gate.contiguous())


@residual_triton_op.register_fake
def _(x, branch, gate, weight, shift, scale, eps, out_dtype):
    B, N, _ = x.shape
    stat = lambda: x.new_empty(B, N, dtype=torch.float32)
    return torch.empty_like(x), x.new_empty(x.shape, dtype=out_dtype), stat(), stat()


def _setup(ctx, inputs, output):
    x, branch, gate, weight, shift, scale, _, _ = inputs
    h, _, mean, rstd = output
    ctx.save_for_backward(h, branch, gate, weight, scale, mean, rstd)
    ctx.dtypes = (x.dtype, branch.dtype, gate.dtype, shift.dtype)
    ctx.mark_non_differentiable(mean, rstd)


def _backward(ctx, dh, dy, _dmean, _drstd):
    h, branch, gate, weight, scale, mean, rstd = ctx.saved_tensors
    xd, bd, gd, sd = ctx.dtypes
    dx, dw, dshift, dscale = ln_modulate_triton_backward(dy, h, weight, scale, mean, rstd)
    dht = dx.float() if dh is None else dx.float() + dh.float()  # (B, N, D)
    return (dht.to(xd), (dht * gate.float().unsqueeze(1)).to(bd), (dht * branch.float()).sum(1).to(gd),
            None if weight is None else dw.to(weight.dtype), dshift.to(sd), dscale.to(scale.dtype), None, None)


residual_triton_op.register_autograd(_backward, setup_context=_setup)


@residual_ln_modulate_op.register("triton", priority=20, available=triton_available_reasons, supports=triton_supports)
def residual_ln_modulate_triton(x, branch, gate, weight, shift, scale, eps):
    check_inputs(x, weight, shift, scale)
    if gate is None:
        gate = torch.ones_like(shift)
    h, y, _, _ = residual_triton_op(x, branch, gate, weight, shift, scale, eps, _out_dtype(x))
    return h, y


def residual_ln_modulate(x, branch, gate, weight, shift, scale, eps, backend=None):
    """(x + gate * branch, LN(x + gate * branch) * (1 + scale) + shift); gate None means 1."""
    return residual_ln_modulate_op(x, branch, gate, weight, shift, scale, eps, backend=backend)
