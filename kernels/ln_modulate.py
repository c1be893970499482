"""Triton kernels of LayerNorm + adaLN modulate (and the gated residual before it), and launchers.

y = LN(x) * w * (1 + scale[b]) + shift[b] over the last dim of x (B, N, D), statistics in
float32, y written in the dtype asked for (bf16 under autocast: no float32 copy then a cast).
With a residual: h = x + gate[b] * branch first, and both h and y are written in one pass.
The backward kernel gives dx per row and, per (sample, block of rows), partial sums of the
shift, scale and weight gradients that the launcher adds up (no atomics: deterministic).
Launchers are plain functions without autograd; microdit/ops/ln_modulate.py wraps them.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import INTERPRET

ROWS = 32 if INTERPRET else 4  # rows per program (the interpreter's cost is per program and op)


@triton.jit
def _fwd_kernel(x_ptr, br_ptr, gate_ptr, w_ptr, shift_ptr, scale_ptr, h_ptr, y_ptr, mean_ptr, rstd_ptr,
                N, D, eps, HAS_W: tl.constexpr, RESIDUAL: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    b = tl.program_id(0)
    n = tl.program_id(1) * ROWS + tl.arange(0, ROWS)
    col = tl.arange(0, BLOCK_D)
    rmask, cmask = n < N, col < D
    m = rmask[:, None] & cmask[None, :]
    off = (b * N + n).to(tl.int64)[:, None] * D + col[None, :]
    x = tl.load(x_ptr + off, mask=m, other=0.0).to(tl.float32)
    if RESIDUAL:
        g = tl.load(gate_ptr + b * D + col, mask=cmask, other=0.0).to(tl.float32)
        x = x + g[None, :] * tl.load(br_ptr + off, mask=m, other=0.0).to(tl.float32)
        tl.store(h_ptr + off, x.to(h_ptr.dtype.element_ty), mask=m)
    mean = tl.sum(x, axis=1) / D
    xc = tl.where(m, x - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=1) / D + eps)
    xhat = xc * rstd[:, None]
    if HAS_W:
        xhat = xhat * tl.load(w_ptr + col, mask=cmask, other=0.0).to(tl.float32)[None, :]
    sc = tl.load(scale_ptr + b * D + col, mask=cmask, other=0.0).to(tl.float32)
    sh = tl.load(shift_ptr + b * D + col, mask=cmask, other=0.0).to(tl.float32)
    y = xhat * (1.0 + sc[None, :]) + sh[None, :]
    tl.store(y_ptr + off, y.to(y_ptr.dtype.element_ty), mask=m)
    tl.store(mean_ptr + b * N + n, mean, mask=rmask)
    tl.store(rstd_ptr + b * N + n, rstd, mask=rmask)


@triton.jit
def _bwd_kernel(dy_ptr, x_ptr, w_ptr, scale_ptr, mean_ptr, rstd_ptr, dx_ptr, dshift_ptr, dscale_ptr, dw_ptr,
                N, D, NBLK, HAS_W: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    b = tl.program_id(0)
    blk = tl.program_id(1)
    n = blk * ROWS + tl.arange(0, ROWS)
    col = tl.arange(0, BLOCK_D)
    rmask, cmask = n < N, col < D
    m = rmask[:, None] & cmask[None, :]
    off = (b * N + n).to(tl.int64)[:, None] * D + col[None, :]
    x = tl.load(x_ptr + off, mask=m, other=0.0).to(tl.float32)
    dy = tl.load(dy_ptr + off, mask=m, other=0.0).to(tl.float32)
    mean = tl.load(mean_ptr + b * N + n, mask=rmask, other=0.0)
    rstd = tl.load(rstd_ptr + b * N + n, mask=rmask, other=0.0)
    xhat = tl.where(m, (x - mean[:, None]) * rstd[:, None], 0.0)
    sc = tl.load(scale_ptr + b * D + col, mask=cmask, other=0.0).to(tl.float32)
    gs = dy * (1.0 + sc[None, :])  # gradient at LN(x) * w
    if HAS_W:
        w = tl.load(w_ptr + col, mask=cmask, other=0.0).to(tl.float32)
        g = gs * w[None, :]
        dscale = tl.sum(dy * xhat * w[None, :], axis=0)
    else:
        g = gs
        dscale = tl.sum(dy * xhat, axis=0)
    c1 = tl.sum(g, axis=1) / D
    c2 = tl.sum(g * xhat, axis=1) / D
    dx = (g - c1[:, None] - xhat * c2[:, None]) * rstd[:, None]
    tl.store(dx_ptr + off, dx.to(dx_ptr.dtype.element_ty), mask=m)
    part = (b * NBLK + blk) * D + col
    tl.store(dshift_ptr + part, tl.sum(dy, axis=0), mask=cmask)
    tl.store(dscale_ptr + part, dscale, mask=cmask)
    if HAS_W:
        tl.store(dw_ptr + part, tl.sum(gs * xhat, axis=0), mask=cmask)


def _grid(B, N):
    return (B, triton.cdiv(N, ROWS))


def ln_modulate_fwd(x, weight, shift, scale, eps, out_dtype, branch=None, gate=None):
    """(B, N, D) -> y (B, N, D) in out_dtype, mean and rstd (B, N) float32; with `branch` and
    `gate`, also h = x + gate * branch (x's dtype), normalised in place of x."""
    B, N, D = x.shape
    y = torch.empty(B, N, D, dtype=out_dtype, device=x.device)
    h = torch.empty_like(x) if branch is not None else y
    mean = torch.empty(B, N, dtype=torch.float32, device=x.device)
    rstd = torch.empty_like(mean)
    if B * N:
        _fwd_kernel[_grid(B, N)](x, branch if branch is not None else x, gate if gate is not None else shift,
                                 weight if weight is not None else shift, shift, scale, h, y, mean, rstd, N, D, eps,
                                 HAS_W=weight is not None, RESIDUAL=branch is not None, ROWS=ROWS,
                                 BLOCK_D=triton.next_power_of_2(D))
    return (h, y, mean, rstd) if branch is not None else (y, mean, rstd)


def ln_modulate_bwd(dy, x, weight, scale, mean, rstd):
    """Gradients (dx, dweight or None, dshift, dscale) of ln_modulate at x (the normalised input)."""
    B, N, D = x.shape
    nblk = triton.cdiv(N, ROWS)
    dx = torch.empty_like(x)
    parts = torch.zeros(3, B, nblk, D, dtype=torch.float32, device=x.device)
    if B * N:
        _bwd_kernel[(B, nblk)](dy, x, weight if weight is not None else scale, scale, mean, rstd, dx,
                               parts[0], parts[1], parts[2], N, D, nblk, HAS_W=weight is not None,
                               ROWS=ROWS, BLOCK_D=triton.next_power_of_2(D))
    dw = parts[2].sum((0, 1)) if weight is not None else None
    return dx, dw, parts[0].sum(1), parts[1].sum(1)
