"""Triton pieces shared by the token ops' kernels (unmask_tokens, unmask_unpatchify).

`inverse_fwd` builds the inverse map inv (B, T) int32 of kept indices ids (B, K): the slot k of
token t, or -1 for a dropped token, so that every output row of a scatter is written exactly
once, by one program (no atomics, deterministic). `dropped_sum_fwd` is the mask token's
gradient (a sum over dropped tokens), of token rows or of an image's patches;
`image_offsets` locates a token's feature in a (B, C, H, W) image.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import INTERPRET, pow2


@triton.jit
def _inverse_kernel(ids_ptr, inv_ptr, R, T, K, BLOCK: tl.constexpr):
    """inv[b, ids[b, k]] = k (inv pre-filled with -1)."""
    r = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    rmask = r < R
    t = tl.load(ids_ptr + r, mask=rmask, other=0)
    tl.store(inv_ptr + (r // K).to(tl.int64) * T + t, (r % K).to(tl.int32), mask=rmask)


def inverse_fwd(ids: torch.Tensor, T: int) -> torch.Tensor:
    """(B, K) kept indices -> (B, T) int32: the slot of each token, -1 where dropped."""
    B, K = ids.shape
    inv = torch.full((B, T), -1, dtype=torch.int32, device=ids.device)
    if B * K:
        _inverse_kernel[(triton.cdiv(B * K, 1024),)](ids, inv, B * K, T, K, BLOCK=1024)
    return inv


@triton.jit
def image_offsets(b, t, f, C, H, W, GW, P: tl.constexpr):
    """Offset in a (B, C, H, W) image of feature f of token t (patch P, grid width GW)."""
    i = t // GW
    j = t % GW
    pr = f // (P * C)
    pc = (f // C) % P
    c = f % C
    return ((b * C + c) * H + i * P + pr).to(tl.int64) * W + j * P + pc


@triton.jit
def _dropped_sum_kernel(src_ptr, inv_ptr, out_ptr, T, F, C, H, W, GW, IMAGE: tl.constexpr, P: tl.constexpr,
                        BLOCK_T: tl.constexpr, BLOCK_F: tl.constexpr):
    """out[b, f] = sum over dropped tokens t (inv[b, t] < 0) of feature f of token t, in out's
    dtype (float32, or float64 for float64), tokens added in a fixed order; src is (B, T, F)
    or, with IMAGE, (B, C, H, W)."""
    b = tl.program_id(0)
    f = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    fm = f < F
    acc = tl.zeros((BLOCK_F,), dtype=out_ptr.dtype.element_ty)
    for t0 in range(0, T, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        k = tl.load(inv_ptr + b * T + t, mask=t < T, other=0)
        m = ((t < T) & (k < 0))[:, None] & fm[None, :]
        if IMAGE:
            offs = image_offsets(b, t[:, None], f[None, :], C, H, W, GW, P)
        else:
            offs = (b * T + t[:, None]).to(tl.int64) * F + f[None, :]
        acc += tl.sum(tl.load(src_ptr + offs, mask=m, other=0.0).to(out_ptr.dtype.element_ty), axis=0)
    tl.store(out_ptr + b * F + f, acc, mask=fm)


def dropped_sum_fwd(src: torch.Tensor, inv: torch.Tensor, grid_w: int = 1, patch: int = 1) -> torch.Tensor:
    """Sum over every sample's dropped tokens, (F,) float32 (float64 for float64 `src`), from
    (B, T, F) tokens or, when `src` is 4-d, a (B, C, H, W) image with tokens of `patch` x
    `patch` on a grid `grid_w` wide."""
    B, T = inv.shape
    image = src.dim() == 4
    if image:
        _, C, H, W = src.shape
        F = patch * patch * C
    else:
        F, C, H, W = src.shape[2], 1, 1, 1
    acc = torch.float64 if src.dtype == torch.float64 else torch.float32
    partial = torch.empty(B, F, dtype=acc, device=src.device)
    block_f = min(pow2(F, 16), 128)
    if B and F:
        _dropped_sum_kernel[(B, triton.cdiv(F, block_f))](
            src, inv, partial, T, F, C, H, W, grid_w, IMAGE=image, P=patch,
            BLOCK_T=min(pow2(T, 16), 256 if INTERPRET else 64), BLOCK_F=block_f)
    return partial.sum(0)
