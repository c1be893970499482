"""Triton kernels of the QK-LayerNorm (LN0 over the whole attention width, no weight, no bias),
and launchers.

The forward reads rows of q or k where the qkv GEMM left them (a strided view: q, k and v are
slices of one (B, N, 3h) output), normalises each in float32 and writes it contiguous in the
dtype asked for (bf16 under autocast: the attention backend's input, with no float32 copy then
a cast), with the row's mean and 1/std. The backward gives dx from dy, x and those statistics.
Launchers are plain functions without autograd; microdit/ops/qk_norm.py wraps them.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import INTERPRET

ROWS = 32 if INTERPRET else 4  # rows per program (the interpreter's cost is per program and op)


@triton.jit
def _load_rows(x_ptr, R, N, D, stride_b, stride_n, ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    """This program's rows r = b * N + n of a (B, N, D) view with unit column stride, in float32
    (zero outside), with the row indices, column indices and the in-bounds mask."""
    r = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    col = tl.arange(0, BLOCK_D)
    live = (r < R)[:, None] & (col < D)[None, :]
    src = ((r // N).to(tl.int64) * stride_b + (r % N).to(tl.int64) * stride_n)[:, None] + col[None, :]
    return r, col, live, tl.load(x_ptr + src, mask=live, other=0.0).to(tl.float32)


@triton.jit
def _fwd_kernel(x_ptr, y_ptr, mean_ptr, rstd_ptr, R, N, D, stride_b, stride_n, eps,
                ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    r, col, live, x = _load_rows(x_ptr, R, N, D, stride_b, stride_n, ROWS, BLOCK_D)
    mu = tl.sum(x, axis=1) / D
    centred = tl.where(live, x - mu[:, None], 0.0)
    inv = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=1) / D + eps)
    dst = r.to(tl.int64)[:, None] * D + col[None, :]
    tl.store(y_ptr + dst, (centred * inv[:, None]).to(y_ptr.dtype.element_ty), mask=live)
    tl.store(mean_ptr + r, mu, mask=r < R)
    tl.store(rstd_ptr + r, inv, mask=r < R)


@triton.jit
def _bwd_kernel(dy_ptr, x_ptr, mean_ptr, rstd_ptr, dx_ptr, R, N, D, stride_b, stride_n,
                ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    r, col, live, x = _load_rows(x_ptr, R, N, D, stride_b, stride_n, ROWS, BLOCK_D)
    dense = r.to(tl.int64)[:, None] * D + col[None, :]
    dy = tl.load(dy_ptr + dense, mask=live, other=0.0).to(tl.float32)
    mu = tl.load(mean_ptr + r, mask=r < R, other=0.0)
    inv = tl.load(rstd_ptr + r, mask=r < R, other=0.0)
    xhat = tl.where(live, (x - mu[:, None]) * inv[:, None], 0.0)
    # d/dx of (x - mean) / std: dy minus its mean, minus xhat times mean(dy * xhat), over std.
    c1 = tl.sum(dy, axis=1) / D
    c2 = tl.sum(dy * xhat, axis=1) / D
    dx = (dy - c1[:, None] - xhat * c2[:, None]) * inv[:, None]
    tl.store(dx_ptr + dense, dx.to(dx_ptr.dtype.element_ty), mask=live)


def _check_rows(x):
    if x.dim() != 3 or x.stride(-1) != 1:
        raise ValueError(f"qk_norm kernels: x must be (B, N, D) with unit column stride; got shape "
                         f"{tuple(x.shape)}, strides {x.stride()}")


def qk_norm_fwd(x, eps, out_dtype):
    """x (B, N, D), rows possibly strided -> y (B, N, D) contiguous in out_dtype, mean and rstd
    (B, N) float32."""
    _check_rows(x)
    B, N, D = x.shape
    y = torch.empty(B, N, D, dtype=out_dtype, device=x.device)
    mean = torch.empty(B, N, dtype=torch.float32, device=x.device)
    rstd = torch.empty_like(mean)
    if B * N:
        _fwd_kernel[(triton.cdiv(B * N, ROWS),)](x, y, mean, rstd, B * N, N, D, x.stride(0), x.stride(1), eps,
                                                 ROWS=ROWS, BLOCK_D=triton.next_power_of_2(D))
    return y, mean, rstd


def qk_norm_bwd(dy, x, mean, rstd):
    """dx (B, N, D) contiguous in x's dtype, from dy (B, N, D) contiguous and the forward's x
    (possibly strided), mean and rstd."""
    _check_rows(x)
    B, N, D = x.shape
    dx = torch.empty(B, N, D, dtype=x.dtype, device=x.device)
    if B * N:
        _bwd_kernel[(triton.cdiv(B * N, ROWS),)](dy, x, mean, rstd, dx, B * N, N, D, x.stride(0), x.stride(1),
                                                 ROWS=ROWS, BLOCK_D=triton.next_power_of_2(D))
    return dx
