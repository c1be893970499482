"""Triton kernel of mask_tokens (a row gather), and its launcher `mask_tokens_fwd`.

No autograd here: microdit/ops/token_rows.py wraps it as a torch.library custom op whose
backward is unmask_tokens' scatter. `ids` (B, K) int64 are the kept tokens of each sample.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import ROWS, row_blocks


@triton.jit
def _gather_kernel(src_ptr, ids_ptr, dst_ptr, R, T, K, D, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """dst[b, k] = src[b, ids[b, k]] for rows r = b*K + k."""
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    col = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    rmask = r < R
    t = tl.load(ids_ptr + r, mask=rmask, other=0)
    src_row = (r // K).to(tl.int64) * T + t
    m = rmask[:, None] & (col[None, :] < D)
    v = tl.load(src_ptr + src_row[:, None] * D + col[None, :], mask=m)
    tl.store(dst_ptr + r[:, None].to(tl.int64) * D + col[None, :], v, mask=m)


def mask_tokens_fwd(src: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """(B, T, D), (B, K) -> (B, K, D)."""
    B, T, D = src.shape
    K = ids.shape[1]
    dst = torch.empty(B, K, D, dtype=src.dtype, device=src.device)
    if B * K and D:
        grid, block_d = row_blocks(B * K, D)
        _gather_kernel[grid](src, ids, dst, B * K, T, K, D, BLOCK_R=ROWS, BLOCK_D=block_d)
    return dst
