"""Triton kernels of SwiGLU's elementwise middle, silu(a) * b of h = [a, b] (the fused W1/W2
GEMM's output, a and b its two halves along the last dim), and launchers.

Forward: one pass reads h and writes silu(a) * b in h's dtype (bf16 under autocast: computed in
float32 and rounded once, where the unfused ops write silu(a) and round twice). Backward: one
pass reads dout and h and writes dh = [dout * b * silu'(a), dout * silu(a)], with
silu'(a) = s (1 + a (1 - s)), s = sigmoid(a): nothing but h is saved.
Launchers are plain functions without autograd; microdit/ops/swiglu.py wraps them.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import INTERPRET

BLOCK = 4096 if INTERPRET else 1024  # elements of the output per program


@triton.jit
def _halves(h_ptr, i, H, total):
    """a and b (float32) of output elements i of an (M, H) result from h (M, 2H), the offset of
    a in h and the in-bounds mask."""
    live = i < total
    ia = (i // H) * (2 * H) + i % H
    a = tl.load(h_ptr + ia, mask=live, other=0.0).to(tl.float32)
    b = tl.load(h_ptr + ia + H, mask=live, other=0.0).to(tl.float32)
    return a, b, ia, live


@triton.jit
def _fwd_kernel(h_ptr, out_ptr, H, total, BLOCK: tl.constexpr):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    a, b, _, live = _halves(h_ptr, i, H, total)
    tl.store(out_ptr + i, (a * tl.sigmoid(a) * b).to(out_ptr.dtype.element_ty), mask=live)


@triton.jit
def _bwd_kernel(dout_ptr, h_ptr, dh_ptr, H, total, BLOCK: tl.constexpr):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    a, b, ia, live = _halves(h_ptr, i, H, total)
    g = tl.load(dout_ptr + i, mask=live, other=0.0).to(tl.float32)
    s = tl.sigmoid(a)
    tl.store(dh_ptr + ia, (g * b * s * (1.0 + a * (1.0 - s))).to(dh_ptr.dtype.element_ty), mask=live)
    tl.store(dh_ptr + ia + H, (g * a * s).to(dh_ptr.dtype.element_ty), mask=live)


def silu_mul_fwd(h):
    """h (M, 2H) contiguous -> silu(h[:, :H]) * h[:, H:] (M, H) in h's dtype."""
    M, H2 = h.shape
    out = torch.empty(M, H2 // 2, dtype=h.dtype, device=h.device)
    if out.numel():
        _fwd_kernel[(triton.cdiv(out.numel(), BLOCK),)](h, out, H2 // 2, out.numel(), BLOCK=BLOCK)
    return out


def silu_mul_bwd(dout, h):
    """dh (M, 2H) from dout (M, H) and h (M, 2H), both contiguous."""
    dh = torch.empty_like(h)
    if dout.numel():
        _bwd_kernel[(triton.cdiv(dout.numel(), BLOCK),)](dout, h, dh, h.shape[1] // 2, dout.numel(), BLOCK=BLOCK)
    return dh
