"""Triton kernels of the expert-choice MoE layer, and their launchers.

Launchers (`router_topk_fwd`, `dispatch_gemm_fwd`, ...) are plain functions on tensors, with no
autograd: microdit/ops/moe.py wraps them as torch.library custom ops. Layouts:
x (B, T, d) tokens; idx (B, E, k) int64 chosen tokens; gates (B, E, k); expert blocks are
expert-major (E, B*k, .), row b*k + j of expert e being token idx[b, e, j] of sample b; the
inverse map inv (B, T, E) int32 holds j, or -1 where expert e did not choose token t.

Everything is deterministic: no atomics; the combine and the dispatch's backward add a token's
contributions in expert order, and the GEMMs do not split K. Accumulation is in float32.
"""
from __future__ import annotations


import torch
import triton
import triton.language as tl

from microdit.ops.moe import expert_rows

from .common import INTERPRET, pow2


def _precision(dtype: torch.dtype) -> str | None:
    # float32 inputs get float32 products (not TF32), so that results stay within float32
    # tolerances of the reference, as torch's default matmul does; others: Triton's default.
    return "ieee" if dtype == torch.float32 else None


# ---------------------------------------------------------------- router: softmax + top-k
@triton.jit
def _softmax_kernel(logits_ptr, probs_ptr, R, E, BLOCK_R: tl.constexpr, BLOCK_E: tl.constexpr):
    """probs = softmax(logits) over the last (expert) axis, in float32, stored in probs' dtype."""
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    c = tl.arange(0, BLOCK_E)
    valid = (r[:, None] < R) & (c[None, :] < E)
    offs = r[:, None].to(tl.int64) * E + c[None, :]
    logits = tl.load(logits_ptr + offs, mask=valid, other=-float("inf")).to(tl.float32)
    row_max = tl.max(logits, axis=1)
    p = tl.exp(logits - tl.where(r < R, row_max, 0.0)[:, None])
    total = tl.sum(p, axis=1)
    p = p / tl.where(total > 0, total, 1.0)[:, None]
    tl.store(probs_ptr + offs, p.to(probs_ptr.dtype.element_ty), mask=valid)


@triton.jit
def _topk_kernel(probs_ptr, gates_ptr, idx_ptr, inv_ptr, T, E, K,
                 BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    """Program (b, e, block of tokens): each token's rank among sample b's tokens for expert e
    (by probability, ties to the lower index) by counting, no sort; ranks below K are the
    expert's slots, in decreasing probability as torch.topk returns them."""
    b = tl.program_id(0)
    e = tl.program_id(1)
    t = tl.program_id(2) * BLOCK_T + tl.arange(0, BLOCK_T)
    tmask = t < T
    p = tl.load(probs_ptr + (b * T + t) * E + e, mask=tmask, other=0.0).to(tl.float32)
    # Packed keys: probabilities are non-negative, so their bits order as integers; the
    # complemented index below them makes every key distinct and breaks ties to the lower index.
    key = (p.to(tl.int32, bitcast=True).to(tl.int64) << 32) | (T - 1 - t).to(tl.int64)
    rank = tl.zeros((BLOCK_T,), dtype=tl.int32)
    for c0 in range(0, T, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        pc = tl.load(probs_ptr + (b * T + c) * E + e, mask=c < T, other=0.0).to(tl.float32)
        kc = (pc.to(tl.int32, bitcast=True).to(tl.int64) << 32) | (T - 1 - c).to(tl.int64)
        kc = tl.where(c < T, kc, -1)
        rank += tl.sum((kc[None, :] > key[:, None]).to(tl.int32), axis=1)
    keep = tmask & (rank < K)
    out = (b * E + e) * K + rank
    tl.store(idx_ptr + out, t.to(tl.int64), mask=keep)
    tl.store(gates_ptr + out, p.to(gates_ptr.dtype.element_ty), mask=keep)
    tl.store(inv_ptr + (b * T + t) * E + e, tl.where(keep, rank, -1), mask=tmask)


def router_fwd(logits: torch.Tensor, k: int, dtype: torch.dtype):
    """logits (B, T, E) -> probs (B, T, E) and gates (B, E, k) in `dtype`, idx (B, E, k) int64,
    inv (B, T, E) int32."""
    B, T, E = logits.shape
    probs = torch.empty(B, T, E, dtype=dtype, device=logits.device)
    gates = torch.empty(B, E, k, dtype=dtype, device=logits.device)
    idx = torch.empty(B, E, k, dtype=torch.int64, device=logits.device)
    inv = torch.empty(B, T, E, dtype=torch.int32, device=logits.device)
    if B * T * E == 0:
        return probs, gates, idx, inv.fill_(-1)
    block_e = pow2(E, 2)
    block_r = max(16, 4096 // block_e)
    _softmax_kernel[(triton.cdiv(B * T, block_r),)](logits, probs, B * T, E, BLOCK_R=block_r, BLOCK_E=block_e)
    block_t = min(pow2(T, 16), 128)
    block_c = min(pow2(T, 16), 256 if INTERPRET else 64)
    _topk_kernel[(B, E, triton.cdiv(T, block_t))](probs, gates, idx, inv, T, E, k,
                                                 BLOCK_T=block_t, BLOCK_C=block_c)
    return probs, gates, idx, inv


@triton.jit
def _router_bwd_kernel(probs_ptr, inv_ptr, dgates_ptr, dlogits_ptr, R, T, E, K,
                       BLOCK_R: tl.constexpr, BLOCK_E: tl.constexpr):
    """dlogits = p * (dp - <p, dp>) with dp[t, e] = dgates[e, inv[t, e]] where chosen, else 0."""
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)  # rows b*T + t
    c = tl.arange(0, BLOCK_E)
    valid = (r[:, None] < R) & (c[None, :] < E)
    offs = r[:, None].to(tl.int64) * E + c[None, :]
    p = tl.load(probs_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    j = tl.load(inv_ptr + offs, mask=valid, other=-1)
    chosen = valid & (j >= 0)
    b = r // T
    dp = tl.load(dgates_ptr + (b[:, None] * E + c[None, :]) * K + j, mask=chosen, other=0.0).to(tl.float32)
    dl = p * (dp - tl.sum(p * dp, axis=1)[:, None])
    tl.store(dlogits_ptr + offs, dl.to(dlogits_ptr.dtype.element_ty), mask=valid)


def router_bwd(probs: torch.Tensor, inv: torch.Tensor, dgates: torch.Tensor) -> torch.Tensor:
    """The router's backward from the gates' gradient: dlogits (B, T, E) in probs' dtype."""
    B, T, E = probs.shape
    dlogits = torch.empty_like(probs)
    block_e = pow2(E, 2)
    block_r = max(16, 4096 // block_e)
    if B * T * E:
        _router_bwd_kernel[(triton.cdiv(B * T, block_r),)](probs, inv, dgates.contiguous(), dlogits, B * T, T, E,
                                                           dgates.shape[2], BLOCK_R=block_r, BLOCK_E=block_e)
    return dlogits


# ---------------------------------------------------------------- combine and its backward
@triton.jit
def _combine_kernel(y_ptr, inv_ptr, gates_ptr, out_ptr, B, T, E, K, D,
                    WEIGHTED: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """out[b, t] = sum over experts e (in order) with j = inv[b, t, e] >= 0 of
    gates[b, e, j] * y[e, b*K + j]: each output row is owned by one program."""
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)  # rows b*T + t
    dcol = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    rmask = r < B * T
    b = r // T
    acc = tl.zeros((BLOCK_R, BLOCK_D), dtype=tl.float32)
    for e in range(0, E):
        j = tl.load(inv_ptr + r * E + e, mask=rmask, other=-1)
        chosen = rmask & (j >= 0)
        src = (e * B + b) * K + j  # row of y (E, B*K, D)
        v = tl.load(y_ptr + src[:, None].to(tl.int64) * D + dcol[None, :],
                    mask=chosen[:, None] & (dcol[None, :] < D), other=0.0).to(tl.float32)
        if WEIGHTED:
            w = tl.load(gates_ptr + (b * E + e) * K + j, mask=chosen, other=0.0).to(tl.float32)
            v = v * w[:, None]
        acc += v
    tl.store(out_ptr + r[:, None].to(tl.int64) * D + dcol[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=rmask[:, None] & (dcol[None, :] < D))


def combine_fwd(y: torch.Tensor, inv: torch.Tensor, gates: torch.Tensor | None, B: int) -> torch.Tensor:
    """y (E, B*k, D), inv (B, T, E) -> (B, T, D), weighted by gates (B, E, k) unless None."""
    E, BK, D = y.shape
    T = inv.shape[1]
    out = torch.empty(B, T, D, dtype=y.dtype, device=y.device)
    block_d = min(pow2(D, 16), 128)
    block_r = 64 if INTERPRET else 16
    if B * T and D:
        _combine_kernel[(triton.cdiv(B * T, block_r), triton.cdiv(D, block_d))](
            y, inv, y if gates is None else gates, out, B, T, E, BK // max(B, 1), D,
            WEIGHTED=gates is not None, BLOCK_R=block_r, BLOCK_D=block_d)
    return out


@triton.jit
def _gather_dot_kernel(g_ptr, y_ptr, idx_ptr, gates_ptr, dy_ptr, dgates_ptr, B, T, E, K, D,
                       BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """The combine's backward. For block rows r = (e, b, j) and h = g[b, idx[b, e, j]]:
    dy[r] = gates[b, e, j] * h and dgates[b, e, j] = <h, y[r]>."""
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = r < E * B * K
    e = r // (B * K)
    b = (r // K) % B
    j = r % K
    src = (b * E + e) * K + j  # (b, e, j) in idx and gates
    tok = tl.load(idx_ptr + src, mask=rmask, other=0)
    w = tl.load(gates_ptr + src, mask=rmask, other=0.0).to(tl.float32)
    dot = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dcol = d0 + tl.arange(0, BLOCK_D)
        m = rmask[:, None] & (dcol[None, :] < D)
        h = tl.load(g_ptr + (b * T + tok)[:, None] * D + dcol[None, :], mask=m, other=0.0).to(tl.float32)
        yv = tl.load(y_ptr + r[:, None].to(tl.int64) * D + dcol[None, :], mask=m, other=0.0).to(tl.float32)
        dot += tl.sum(h * yv, axis=1)
        tl.store(dy_ptr + r[:, None].to(tl.int64) * D + dcol[None, :],
                 (h * w[:, None]).to(dy_ptr.dtype.element_ty), mask=m)
    tl.store(dgates_ptr + src, dot.to(dgates_ptr.dtype.element_ty), mask=rmask)


def combine_bwd(grad: torch.Tensor, y: torch.Tensor, idx: torch.Tensor, gates: torch.Tensor):
    """grad (B, T, D), y (E, B*k, D) -> dy (E, B*k, D), dgates (B, E, k)."""
    B, T, D = grad.shape
    _, E, K = idx.shape
    dy = torch.empty_like(y)
    dgates = torch.empty_like(gates)
    block_r, block_d = (64 if INTERPRET else 16), min(pow2(D, 16), 128)
    if B * E * K:
        _gather_dot_kernel[(triton.cdiv(E * B * K, block_r),)](
            grad, y, idx, gates, dy, dgates, B, T, E, K, D, BLOCK_R=block_r, BLOCK_D=block_d)
    return dy, dgates


# ---------------------------------------------------------------- grouped GEMM over experts
def _gemm_configs():
    if INTERPRET:  # few, large programs: the interpreter's cost is per program and op
        return [triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 8})]
    return [
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32, "GROUP_M": 8}, num_warps=4, num_stages=4),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 32, "GROUP_M": 8}, num_warps=4, num_stages=4),
    ]


@triton.autotune(configs=_gemm_configs(), key=["M", "N", "K", "GATHER", "EPILOGUE"])
@triton.jit
def _grouped_gemm_kernel(a_ptr, b_ptr, c_ptr, aux_ptr, c2_ptr, rows_ptr, M, N, K,
                         s_ae, s_am, s_ak, s_be, s_bk, s_bn, s_ce, s_cm, s_cn, s_re,
                         GATHER: tl.constexpr, EPILOGUE: tl.constexpr, PRECISION: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                         GROUP_M: tl.constexpr):
    """C[e] = A[e] @ B[e] for every expert e (program axis 1), float32 accumulation.

    GATHER 1: A's row m is row rows[e, m] of A (the dispatch fused into the load); GATHER 2:
    A's column k is rows[e, k] (a gathered operand transposed, for the weight gradient).
    EPILOGUE 1: C = gelu(acc), C2 = gelu'(acc) (exact GELU); EPILOGUE 2: C = acc * AUX.
    """
    pid = tl.program_id(0)
    e = tl.program_id(1).to(tl.int64)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    group = pid // (GROUP_M * num_n)  # grouped order: neighbouring programs share B tiles
    first_m = group * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * num_n)) % size_m
    pid_n = (pid % (GROUP_M * num_n)) // size_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mmask = offs_m < M
    nmask = offs_n < N
    a_base = a_ptr + e * s_ae
    b_base = b_ptr + e * s_be
    if GATHER == 1:
        am = tl.load(rows_ptr + e * s_re + offs_m, mask=mmask, other=0).to(tl.int64)
    else:
        am = offs_m.to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        kmask = offs_k < K
        if GATHER == 2:
            ak = tl.load(rows_ptr + e * s_re + offs_k, mask=kmask, other=0).to(tl.int64)
        else:
            ak = offs_k.to(tl.int64)
        a = tl.load(a_base + am[:, None] * s_am + ak[None, :] * s_ak,
                    mask=mmask[:, None] & kmask[None, :], other=0.0)
        b = tl.load(b_base + offs_k[:, None].to(tl.int64) * s_bk + offs_n[None, :] * s_bn,
                    mask=kmask[:, None] & nmask[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)

    c_offs = e * s_ce + offs_m[:, None].to(tl.int64) * s_cm + offs_n[None, :] * s_cn
    cmask = mmask[:, None] & nmask[None, :]
    if EPILOGUE == 1:
        cdf = 0.5 + 0.5 * tl.math.erf(acc * 0.7071067811865476)
        slope = cdf + acc * 0.3989422804014327 * tl.exp(-0.5 * acc * acc)
        tl.store(c2_ptr + c_offs, slope.to(c2_ptr.dtype.element_ty), mask=cmask)
        acc = acc * cdf
    elif EPILOGUE == 2:
        acc = acc * tl.load(aux_ptr + c_offs, mask=cmask, other=0.0).to(tl.float32)
    tl.store(c_ptr + c_offs, acc.to(c_ptr.dtype.element_ty), mask=cmask)


def _strides3(t: torch.Tensor, shared: bool = False):
    s = t.stride()
    return (0 if shared else s[0]), s[1], s[2]


def grouped_gemm(a: torch.Tensor, b: torch.Tensor, *, m: int, k: int, rows: torch.Tensor | None = None,
                 gather: int = 0, a_strides=None, epilogue: int = 0, aux: torch.Tensor | None = None,
                 out_dtype: torch.dtype | None = None):
    """Per-expert C[e] (m, n) = A[e] (m, k) @ b[e] (k, n), with b (E, k, n) any strides.

    A is `a` with explicit `a_strides` (expert, row, column) in elements (expert stride 0 to
    share `a` across experts) and, with `gather`, indirect rows (1) or columns (2) through
    `rows` (E, m or k). Returns C (E, m, n), and gelu'(pre-activation) too with epilogue 1.
    """
    E, _, n = b.shape
    dtype = out_dtype or b.dtype
    c = torch.empty(E, m, n, dtype=dtype, device=b.device)
    c2 = torch.empty_like(c) if epilogue == 1 else c
    if E * m * n == 0:
        return (c.zero_(), c2.zero_()) if epilogue == 1 else c.zero_()
    s_ae, s_am, s_ak = a_strides
    s_be, s_bk, s_bn = b.stride()
    rows_t = rows if rows is not None else c
    s_re = rows.stride(0) if rows is not None else 0
    aux_t = aux if aux is not None else c

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]), E)

    _grouped_gemm_kernel[grid](a, b, c, aux_t, c2, rows_t, m, n, k,
                               s_ae, s_am, s_ak, s_be, s_bk, s_bn, c.stride(0), c.stride(1), c.stride(2), s_re,
                               GATHER=gather, EPILOGUE=epilogue, PRECISION=_precision(b.dtype))
    return (c, c2) if epilogue == 1 else c


# ---------------------------------------------------------------- the layer
def moe_fwd(x, gate_weight, w1, w2, k: int):
    """The layer's forward. Returns out (B, T, d) and what the backward needs:
    probs (B, T, E), gates, idx (B, E, k), inv (B, T, E), act and dgelu (E, B*k, hidden), y (E, B*k, d)."""
    B, T, d = x.shape
    E, _, hidden = w1.shape
    x = x.contiguous()
    logits = torch.nn.functional.linear(x, gate_weight).contiguous()  # (B, T, E): a small GEMM (cuBLAS)
    probs, gates, idx, inv = router_fwd(logits, k, x.dtype)
    rows = expert_rows(idx, T)  # (E, B*k)
    act, dgelu = grouped_gemm(x, w1, m=B * k, k=d, rows=rows, gather=1, a_strides=(0, d, 1), epilogue=1)
    y = grouped_gemm(act, w2, m=B * k, k=hidden, a_strides=act.stride())  # (E, B*k, d)
    out = combine_fwd(y, inv, gates, B)
    return out, probs, gates, idx, inv, act, dgelu, y


def moe_bwd(grad, x, gate_weight, w1, w2, probs, gates, idx, inv, act, dgelu, y):
    """Gradients (dx, dgate_weight, dw1, dw2) of the layer from the forward's saved tensors."""
    B, T, d = x.shape
    E, _, hidden = w1.shape
    k = idx.shape[2]
    x = x.contiguous()
    dy, dgates = combine_bwd(grad.contiguous(), y, idx, gates)  # (E, B*k, d), (B, E, k)
    # dh = (dy @ w2^T) * gelu'(pre-activation): the GELU's backward in the GEMM's epilogue.
    w2t = w2.transpose(1, 2)  # (E, d, hidden), a view
    dh = grouped_gemm(dy, w2t, m=B * k, k=d, a_strides=dy.stride(), epilogue=2, aux=dgelu)
    # dw2 = act^T @ dy, dw1 = x[rows]^T @ dh (the gather fused into the operand's load).
    dw2 = grouped_gemm(act, dy, m=hidden, k=B * k, a_strides=(act.stride(0), act.stride(2), act.stride(1)))
    rows = expert_rows(idx, T)
    dw1 = grouped_gemm(x, dh, m=d, k=B * k, rows=rows, gather=2, a_strides=(0, 1, d))
    dxin = grouped_gemm(dh, w1.transpose(1, 2), m=B * k, k=hidden, a_strides=dh.stride())  # (E, B*k, d)
    dx = combine_fwd(dxin, inv, None, B)  # (B, T, d)
    dlogits = router_bwd(probs, inv, dgates)  # (B, T, E)
    dgate = dlogits.reshape(B * T, -1).t().mm(x.reshape(B * T, d)).to(gate_weight.dtype)
    dx.view(B * T, d).addmm_(dlogits.reshape(B * T, -1), gate_weight.to(dx.dtype))
    return dx, dgate, dw1.to(w1.dtype), dw2.to(w2.dtype)
