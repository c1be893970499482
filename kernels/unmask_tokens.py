"""Triton kernel of unmask_tokens (a scatter through the inverse map), and `unmask_tokens_fwd`.

The inverse map inv (B, T) int32 (kernels/token_rows.py) holds the slot k of token t, or -1 for
a dropped token, so that every output row is written exactly once, by one program (no atomics,
deterministic). microdit/ops/token_rows.py wraps it as a custom op.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import ROWS, row_blocks


@triton.jit
def _scatter_kernel(src_ptr, inv_ptr, fill_ptr, dst_ptr, R, T, K, D, HAS_FILL: tl.constexpr,
                    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """dst[b, t] = src[b, inv[b, t]] where kept, else fill (or zeros), for rows r = b*T + t."""
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    col = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    rmask = r < R
    cmask = col < D
    k = tl.load(inv_ptr + r, mask=rmask, other=-1)
    kept = rmask & (k >= 0)
    src_row = (r // T).to(tl.int64) * K + k
    v = tl.load(src_ptr + src_row[:, None] * D + col[None, :], mask=kept[:, None] & cmask[None, :], other=0.0)
    if HAS_FILL:
        f = tl.load(fill_ptr + col, mask=cmask, other=0.0)
        v = tl.where(kept[:, None], v, f[None, :])
    tl.store(dst_ptr + r[:, None].to(tl.int64) * D + col[None, :], v, mask=rmask[:, None] & cmask[None, :])


def unmask_tokens_fwd(src: torch.Tensor, inv: torch.Tensor, fill: torch.Tensor | None) -> torch.Tensor:
    """(B, K, D), inv (B, T) -> (B, T, D): kept rows in place, `fill` (D,) or zeros elsewhere."""
    B, K, D = src.shape
    T = inv.shape[1]
    dst = torch.empty(B, T, D, dtype=src.dtype, device=src.device)
    if B * T and D:
        grid, block_d = row_blocks(B * T, D)
        _scatter_kernel[grid](src, inv, src if fill is None else fill, dst, B * T, T, K, D,
                              HAS_FILL=fill is not None, BLOCK_R=ROWS, BLOCK_D=block_d)
    return dst
