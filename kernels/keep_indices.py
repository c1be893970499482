"""Triton kernel of keep_indices (ranks counted instead of sorted), and `keep_indices_fwd`.

microdit/ops/keep_indices.py wraps it as a torch.library custom op.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import INTERPRET, pow2


@triton.jit
def _keep_kernel(noise_ptr, ids_ptr, T, K, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    """ids[b, rank(t)] = t for the K tokens of smallest noise, rank(t) counted (no sort): the
    first K entries of argsort(noise[b]), i.e. a uniformly random subset in random order."""
    b = tl.program_id(0)
    t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    tmask = t < T
    v = tl.load(noise_ptr + b * T + t, mask=tmask, other=0.0)
    rank = tl.zeros((BLOCK_T,), dtype=tl.int32)
    for c0 in range(0, T, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        vc = tl.load(noise_ptr + b * T + c, mask=c < T, other=float("inf"))
        before = (vc[None, :] < v[:, None]) | ((vc[None, :] == v[:, None]) & (c[None, :] < t[:, None]))
        rank += tl.sum((before & (c < T)[None, :]).to(tl.int32), axis=1)
    keep = tmask & (rank < K)
    tl.store(ids_ptr + b * K + rank, t.to(tl.int64), mask=keep)


def keep_indices_fwd(noise: torch.Tensor, K: int) -> torch.Tensor:
    """(B, T) uniform noise -> (B, K) int64: the indices of each row's K smallest values, in order."""
    B, T = noise.shape
    ids = torch.empty(B, K, dtype=torch.int64, device=noise.device)
    block_t = min(pow2(T, 16), 128)
    if B * K:
        _keep_kernel[(B, triton.cdiv(T, block_t))](noise, ids, T, K, BLOCK_T=block_t,
                                                   BLOCK_C=min(pow2(T, 16), 256 if INTERPRET else 64))
    return ids
