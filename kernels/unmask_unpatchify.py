"""Triton kernels of unmask_unpatchify, and their launchers.

`unmask_unpatchify_fwd` writes the (B, C, H, W) image straight from the kept tokens through the
inverse map (kernels/token_rows.py), the mask token where dropped; `gather_image_fwd` (its
backward) reads the kept tokens' patches straight from the image gradient. Token t of a
(gh, gw) grid is row t // gw, column t % gw; its p*p*C features are laid out (row in patch,
column in patch, channel), as MicroDiT's unpatchify reads them. microdit/ops/unmask_unpatchify.py
wraps both as torch.library custom ops.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import ROWS, pow2, row_blocks
from .token_rows import image_offsets


@triton.jit
def _unmask_image_kernel(src_ptr, inv_ptr, fill_ptr, dst_ptr, K, T, C, H, W, GW, F,
                         P: tl.constexpr, HAS_FILL: tl.constexpr, BLOCK_C: tl.constexpr,
                         BLOCK_W: tl.constexpr):
    """Program (b, image row y): dst[b, :, y, :] from the kept tokens of patch row y // P, or
    the fill (mask token) where dropped. Writes are contiguous along x for every channel."""
    b = tl.program_id(0)
    y = tl.program_id(1)
    c = tl.arange(0, BLOCK_C)
    x = tl.program_id(2) * BLOCK_W + tl.arange(0, BLOCK_W)
    cm = c < C
    xm = x < W
    t = (y // P) * GW + x // P  # (BLOCK_W,)
    f = ((y % P) * P + x % P)[None, :] * C + c[:, None]  # (BLOCK_C, BLOCK_W) feature of the token
    k = tl.load(inv_ptr + b * T + t, mask=xm, other=-1)
    kept = xm & (k >= 0)
    m = cm[:, None] & kept[None, :]
    v = tl.load(src_ptr + (b.to(tl.int64) * K + k)[None, :] * F + f, mask=m, other=0.0)
    if HAS_FILL:
        fv = tl.load(fill_ptr + f, mask=cm[:, None] & xm[None, :], other=0.0)
        v = tl.where(kept[None, :], v, fv)
    offs = ((b * C + c[:, None]) * H + y).to(tl.int64) * W + x[None, :]
    tl.store(dst_ptr + offs, v, mask=cm[:, None] & xm[None, :])


def unmask_unpatchify_fwd(src: torch.Tensor, inv: torch.Tensor, fill: torch.Tensor | None,
                          grid_h: int, grid_w: int, patch: int, channels: int) -> torch.Tensor:
    """(B, K, p*p*C), inv (B, T) -> (B, C, grid_h*p, grid_w*p) in one pass."""
    B, K, F = src.shape
    T = inv.shape[1]
    H, W = grid_h * patch, grid_w * patch
    dst = torch.empty(B, channels, H, W, dtype=src.dtype, device=src.device)
    block_w = min(pow2(W, 16), 256)
    if dst.numel():
        _unmask_image_kernel[(B, H, triton.cdiv(W, block_w))](
            src, inv, src if fill is None else fill, dst, K, T, channels, H, W, grid_w, F,
            P=patch, HAS_FILL=fill is not None, BLOCK_C=pow2(channels, 1), BLOCK_W=block_w)
    return dst


@triton.jit
def _gather_image_kernel(img_ptr, ids_ptr, dst_ptr, R, K, C, H, W, GW, F, P: tl.constexpr,
                         BLOCK_R: tl.constexpr, BLOCK_F: tl.constexpr):
    """dst[b, k, f] = feature f of token ids[b, k] of the image (the fused op's backward)."""
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    f = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    rmask = r < R
    t = tl.load(ids_ptr + r, mask=rmask, other=0)
    m = rmask[:, None] & (f[None, :] < F)
    v = tl.load(img_ptr + image_offsets((r // K)[:, None], t[:, None], f[None, :], C, H, W, GW, P), mask=m)
    tl.store(dst_ptr + r[:, None].to(tl.int64) * F + f[None, :], v, mask=m)


def gather_image_fwd(img: torch.Tensor, ids: torch.Tensor, grid_w: int, patch: int) -> torch.Tensor:
    """(B, C, H, W), (B, K) -> (B, K, p*p*C): the kept tokens' patches."""
    B, C, H, W = img.shape
    K = ids.shape[1]
    F = patch * patch * C
    dst = torch.empty(B, K, F, dtype=img.dtype, device=img.device)
    if B * K and F:
        grid, block_f = row_blocks(B * K, F)
        _gather_image_kernel[grid](img, ids, dst, B * K, K, C, H, W, grid_w, F, P=patch, BLOCK_R=ROWS,
                                   BLOCK_F=block_f)
    return dst
