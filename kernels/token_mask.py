"""Triton kernels of token masking, and their launchers.

Launchers (`gather_tokens_fwd`, `scatter_tokens_fwd`, ...) are plain functions on tensors, with
no autograd: microdit/ops/token_mask.py wraps them as torch.library custom ops. `ids` (B, K)
int64 are the kept tokens of each sample (unique within a row); the inverse map inv (B, T)
int32 holds the slot k of token t, or -1 for a dropped token, so that every output row of a
scatter is written exactly once, by one program (no atomics, deterministic).

Token t of a (gh, gw) grid is row t // gw, column t % gw; its p*p*C features are laid out
(row in patch, column in patch, channel), as MicroDiT's unpatchify reads them.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# Rows per program: the interpreter's cost is per program and op, so it gets fewer, larger ones.
ROWS = 64 if INTERPRET else 16


def _pow2(n: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(int(n)))


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


def gather_tokens_fwd(src: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """(B, T, D), (B, K) -> (B, K, D)."""
    B, T, D = src.shape
    K = ids.shape[1]
    dst = torch.empty(B, K, D, dtype=src.dtype, device=src.device)
    block_d = min(_pow2(D), 256)
    if B * K and D:
        _gather_kernel[(triton.cdiv(B * K, ROWS), triton.cdiv(D, block_d))](
            src, ids, dst, B * K, T, K, D, BLOCK_R=ROWS, BLOCK_D=block_d)
    return dst


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


def scatter_tokens_fwd(src: torch.Tensor, inv: torch.Tensor, fill: torch.Tensor | None) -> torch.Tensor:
    """(B, K, D), inv (B, T) -> (B, T, D): kept rows in place, `fill` (D,) or zeros elsewhere."""
    B, K, D = src.shape
    T = inv.shape[1]
    dst = torch.empty(B, T, D, dtype=src.dtype, device=src.device)
    block_d = min(_pow2(D), 256)
    if B * T and D:
        _scatter_kernel[(triton.cdiv(B * T, ROWS), triton.cdiv(D, block_d))](
            src, inv, src if fill is None else fill, dst, B * T, T, K, D, HAS_FILL=fill is not None,
            BLOCK_R=ROWS, BLOCK_D=block_d)
    return dst


# ---------------------------------------------------------------- tokens <-> image
@triton.jit
def _image_offsets(b, t, f, C, H, W, GW, P: tl.constexpr):
    """Offset in a (B, C, H, W) image of feature f of token t (patch P, grid width GW)."""
    i = t // GW
    j = t % GW
    pr = f // (P * C)
    pc = (f // C) % P
    c = f % C
    return ((b * C + c) * H + i * P + pr).to(tl.int64) * W + j * P + pc


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
    block_w = min(_pow2(W), 256)
    if dst.numel():
        _unmask_image_kernel[(B, H, triton.cdiv(W, block_w))](
            src, inv, src if fill is None else fill, dst, K, T, channels, H, W, grid_w, F,
            P=patch, HAS_FILL=fill is not None, BLOCK_C=_pow2(channels, 1), BLOCK_W=block_w)
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
    v = tl.load(img_ptr + _image_offsets((r // K)[:, None], t[:, None], f[None, :], C, H, W, GW, P), mask=m)
    tl.store(dst_ptr + r[:, None].to(tl.int64) * F + f[None, :], v, mask=m)


def gather_image_fwd(img: torch.Tensor, ids: torch.Tensor, grid_w: int, patch: int) -> torch.Tensor:
    """(B, C, H, W), (B, K) -> (B, K, p*p*C): the kept tokens' patches."""
    B, C, H, W = img.shape
    K = ids.shape[1]
    F = patch * patch * C
    dst = torch.empty(B, K, F, dtype=img.dtype, device=img.device)
    block_f = min(_pow2(F), 256)
    if B * K and F:
        _gather_image_kernel[(triton.cdiv(B * K, ROWS), triton.cdiv(F, block_f))](
            img, ids, dst, B * K, K, C, H, W, grid_w, F, P=patch, BLOCK_R=ROWS, BLOCK_F=block_f)
    return dst


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
            offs = _image_offsets(b, t[:, None], f[None, :], C, H, W, GW, P)
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
    block_f = min(_pow2(F), 128)
    if B and F:
        _dropped_sum_kernel[(B, triton.cdiv(F, block_f))](
            src, inv, partial, T, F, C, H, W, grid_w, IMAGE=image, P=patch,
            BLOCK_T=min(_pow2(T), 256 if INTERPRET else 64), BLOCK_F=block_f)
    return partial.sum(0)


# ---------------------------------------------------------------- keep indices
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
    block_t = min(_pow2(T), 128)
    if B * K:
        _keep_kernel[(B, triton.cdiv(T, block_t))](noise, ids, T, K, BLOCK_T=block_t,
                                                   BLOCK_C=min(_pow2(T), 256 if INTERPRET else 64))
    return ids
