"""Expert-choice mixture-of-experts feed-forward: routing, dispatch, expert FFNs, combine.

Per sample with T tokens, each of E experts takes the top k = int(capacity * T / E) tokens by
its router probability (softmax over experts); token j's output is the sum over the (expert,
slot) pairs that chose it of prob[j, e] * W2_e(GELU(W1_e x_j)).

The reference backend computes this as the published code does: dispatch and combine are
einsums against a dense one-hot tensor of shape (B, E, k, T), which costs O(T^2 d) per sample.
Faster backends move tokens into per-expert contiguous blocks (E, B*k, d) so that each expert's
FFN is one GEMM over all samples, and combine deterministically through the inverse map
inv (B, T, E) (each token sums its experts' rows in expert order; no atomics):
  torch   index_select / batched matmuls / index_add_ (atomics on CUDA)
  cpp     microdit._C kernels (OpenMP) between MKL GEMMs; one autograd node for the layer
  cuda    the same kernels on the GPU, between cuBLAS GEMMs
  cublaslt  the cuda backend with the GELU in the expert GEMMs' cuBLASLt epilogues (GELU_AUX
          forward, DGELU backward); that GELU is the tanh form, so bf16/fp16 only, and chosen
          only when asked for (the default stays the published exact GELU)
  triton  kernels/moe.py: router, grouped GEMMs with the dispatch and GELU fused
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import _ext
from ..availability import extension_cuda_reasons, extension_reasons, triton_available_reasons, triton_device_reasons
from .registry import Op

moe_op = Op("moe", "expert-choice MoE layer: router top-k, dispatch, expert FFN, combine")


def expert_capacity(num_tokens: int, num_experts: int, capacity: float) -> int:
    """Tokens each expert takes per sample."""
    return int(capacity * num_tokens / num_experts)


def route(x, gate_weight, k):
    """Router probabilities (B, T, E) and each expert's top-k (probs, token indices) (B, E, k)."""
    probs = F.linear(x, gate_weight).softmax(dim=-1)  # (B, T, E)
    gates, idx = torch.topk(probs.transpose(1, 2), k, dim=-1)  # (B, E, k)
    return probs, gates, idx


def softmax_backward(dprobs: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """d logits of probs = softmax(logits, -1) from d probs: probs * (dprobs - <dprobs, probs>)."""
    return probs * (dprobs - (dprobs * probs).sum(dim=-1, keepdim=True))


@moe_op.register("reference", priority=0)
def moe_reference(x, gate_weight, w1, w2, capacity):
    """Published: one-hot dispatch/combine einsums."""
    B, T, d = x.shape
    k = expert_capacity(T, w1.shape[0], capacity)
    _, gates, idx = route(x, gate_weight, k)
    onehot = F.one_hot(idx, num_classes=T).to(x.dtype)  # (B, E, k, T)
    xin = torch.einsum("bekt,btd->bekd", onehot, x)
    h = F.gelu(torch.einsum("bekd,edh->bekh", xin, w1))
    out = torch.einsum("bekh,ehd->bekd", h, w2)
    out = gates.unsqueeze(-1) * out
    return torch.einsum("bekt,bekd->btd", onehot, out)


def expert_rows(idx: torch.Tensor, T: int) -> torch.Tensor:
    """(B, E, k) token indices -> (E, B*k) int64: each expert block row's row in x.view(B*T, d)."""
    B, E, k = idx.shape
    offsets = torch.arange(B, device=idx.device).mul_(T).view(B, 1, 1)
    return (idx + offsets).transpose(0, 1).reshape(E, B * k)


def _experts(xin, w1, w2):
    """(E, M, d) -> (E, M, d): every expert's FFN on its own block, one batched GEMM per weight."""
    return torch.bmm(F.gelu(torch.bmm(xin, w1)), w2)  # (E, M, hidden) in between


@moe_op.register("torch", priority=10)
def moe_torch(x, gate_weight, w1, w2, capacity, experts=None):
    """Row gather into per-expert blocks, batched expert GEMMs, weighted `index_add_` combine.
    `experts(xin, w1, w2)` replaces the expert FFN (microdit.fp8 runs it in FP8)."""
    B, T, d = x.shape
    E = w1.shape[0]
    k = expert_capacity(T, E, capacity)
    _, gates, idx = route(x, gate_weight, k)  # (B, E, k)
    rows = expert_rows(idx, T).reshape(-1)  # (E*B*k,)
    xin = x.reshape(B * T, d).index_select(0, rows).view(E, B * k, d)  # (E, B*k, d)
    y = (experts or _experts)(xin, w1, w2) * gates.transpose(0, 1).reshape(E, B * k, 1)  # (E, B*k, d)
    # index_add_ adds in index order on the CPU (deterministic); CUDA uses atomics.
    return y.new_zeros(B * T, d).index_add_(0, rows, y.view(E * B * k, d)).view(B, T, d)


# ---------------------------------------------------------------- compiled kernels (microdit._C)
# Dispatch and combine as custom ops (fake and autograd registered, so they trace under
# torch.compile); the expert GEMMs between them stay torch's (MKL, cuBLAS). The inverse map
# inv (B, T, E) lets every output row of the combine, and of the dispatch's backward, be
# written by one thread in a fixed expert order: deterministic, no atomics.
@torch.library.custom_op("microdit::moe_inverse", mutates_args=())
def moe_inverse_ext(idx: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """(B, E, k) int64 -> (B, T, E) int32: the slot of token t in expert e, or -1."""
    return _ext.moe_inverse(idx.contiguous(), num_tokens)


@moe_inverse_ext.register_fake
def _(idx, num_tokens):
    return idx.new_empty(idx.shape[0], num_tokens, idx.shape[1], dtype=torch.int32)


@torch.library.custom_op("microdit::moe_dispatch", mutates_args=())
def moe_dispatch_ext(x: torch.Tensor, idx: torch.Tensor, inv: torch.Tensor) -> torch.Tensor:
    """(B, T, d), idx (B, E, k) -> (E, B, k, d): every expert's chosen tokens, contiguous."""
    return _ext.moe_dispatch(x.contiguous(), idx.contiguous())


@moe_dispatch_ext.register_fake
def _(x, idx, inv):
    return x.new_empty(idx.shape[1], x.shape[0], idx.shape[2], x.shape[2])


@torch.library.custom_op("microdit::moe_combine", mutates_args=())
def moe_combine_ext(y: torch.Tensor, gates: torch.Tensor | None, idx: torch.Tensor, inv: torch.Tensor) -> torch.Tensor:
    """(E, B, k, d) -> (B, T, d): out[b, t] = sum of gates[b, e, j] * y[e, b, j] over the
    (e, j) that chose t (gates None: ones), in expert order."""
    g = None if gates is None else gates.to(y.dtype).contiguous()
    return _ext.moe_combine(y.contiguous(), inv.contiguous(), g)


@moe_combine_ext.register_fake
def _(y, gates, idx, inv):
    return y.new_empty(y.shape[1], inv.shape[1], y.shape[3])


@torch.library.custom_op("microdit::moe_combine_backward", mutates_args=())
def moe_combine_backward_ext(grad: torch.Tensor, y: torch.Tensor, gates: torch.Tensor,
                             idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One pass over the gathered gradient rows g = grad[b, idx[b, e, j]]: (gates * g, <g, y>)."""
    return _ext.moe_combine_backward(grad.contiguous(), y.contiguous(), idx.contiguous(),
                               gates.to(y.dtype).contiguous())


@moe_combine_backward_ext.register_fake
def _(grad, y, gates, idx):
    return torch.empty_like(y), gates.new_empty(gates.shape, dtype=y.dtype)


def _dispatch_setup(ctx, inputs, output):
    _, idx, inv = inputs
    ctx.save_for_backward(idx, inv)


def _dispatch_backward(ctx, grad):
    idx, inv = ctx.saved_tensors
    return moe_combine_ext(grad, None, idx, inv), None, None


def _combine_setup(ctx, inputs, output):
    y, gates, idx, inv = inputs
    ctx.save_for_backward(y, gates, idx, inv)
    ctx.gates_dtype = None if gates is None else gates.dtype


def _combine_backward(ctx, grad):
    y, gates, idx, inv = ctx.saved_tensors
    if gates is None:
        return moe_dispatch_ext(grad, idx, inv), None, None, None
    dy, dgates = moe_combine_backward_ext(grad, y, gates, idx)
    return dy, dgates.to(ctx.gates_dtype), None, None


moe_dispatch_ext.register_autograd(_dispatch_backward, setup_context=_dispatch_setup)
moe_combine_ext.register_autograd(_combine_backward, setup_context=_combine_setup)


@torch.library.custom_op("microdit::moe_gelu_", mutates_args=("h",))
def moe_gelu_ext_(h: torch.Tensor) -> torch.Tensor:
    """In place h = gelu(h) (exact, erf); returns gelu'(h) of the input for the backward."""
    if not h.is_contiguous():
        raise ValueError("moe_gelu_: h must be contiguous (it is updated in place)")
    return _ext.moe_gelu_(h)


@moe_gelu_ext_.register_fake
def _(h):
    return torch.empty_like(h)


# ---------------------------------------------------------------- cuBLASLt epilogues
# The expert FFN's first GEMM with the GELU in its epilogue (which also writes the
# pre-activation), and the backward's GEMM with the GELU's derivative in its epilogue (reading
# it). cuBLASLt's GELU is the tanh form. It differs from the published exact GELU by at most
# TANH_GELU_MAX_ERROR in absolute terms (at |x| ~ 2.7; its derivative by 8.7e-4, at x ~ -2.0).
# That is far inside bf16's rounding of activations of size 1-3 (4e-3 to 8e-3), which is the
# scale of the next GEMM's inputs, but it is not one rounding of every output: gelu(-2.7) =
# -0.0094 comes out 5% off. Hence bf16/fp16 only, and only when asked for. On the CPU the two
# ops compute the same in torch (float32, then rounded as the epilogue rounds): what the CPU
# tests of the layer run, and what the GPU check compares cuBLASLt with.
TANH_GELU_MAX_ERROR = 4.8e-4  # max |gelu_tanh(x) - gelu(x)| over all x: 4.73e-4, at |x| = 2.699


def _epilogue_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.promote_types(t.dtype, torch.float32)  # float32 as cuBLASLt; float64 kept for tests


def gemm_gelu_aux_emulated(x: torch.Tensor, w1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(gelu_tanh(x @ w1), x @ w1) with float32 accumulation and epilogue, rounded to x's dtype."""
    acc = _epilogue_dtype(x)
    pre = torch.bmm(x.to(acc), w1.to(acc))
    return F.gelu(pre, approximate="tanh").to(x.dtype), pre.to(x.dtype)


def gemm_dgelu_emulated(dy: torch.Tensor, w2: torch.Tensor, aux: torch.Tensor) -> torch.Tensor:
    """(dy @ w2^T) * gelu_tanh'(aux), in float32, rounded to dy's dtype."""
    acc = _epilogue_dtype(dy)
    g = torch.bmm(dy.to(acc), w2.to(acc).transpose(1, 2))
    return torch.ops.aten.gelu_backward(g, aux.to(acc), approximate="tanh").to(dy.dtype)


@torch.library.custom_op("microdit::moe_gemm_gelu_aux", mutates_args=())
def moe_gemm_gelu_aux_ext(x: torch.Tensor, w1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (E, M, d), w1 (E, d, hidden) -> (gelu_tanh(x @ w1), x @ w1), each (E, M, hidden)."""
    if x.device.type == "cuda":
        return _ext.moe_gemm_gelu_aux(x.contiguous(), w1.contiguous())
    return gemm_gelu_aux_emulated(x, w1)


@moe_gemm_gelu_aux_ext.register_fake
def _(x, w1):
    out = x.new_empty(x.shape[0], x.shape[1], w1.shape[2])
    return out, torch.empty_like(out)


@torch.library.custom_op("microdit::moe_gemm_dgelu_", mutates_args=("out",))
def moe_gemm_dgelu_ext_(dy: torch.Tensor, w2: torch.Tensor, aux: torch.Tensor, out: torch.Tensor) -> None:
    """out = (dy @ w2^T) * gelu_tanh'(aux): dy (E, M, d), w2 (E, hidden, d), aux and out (E, M, hidden)."""
    if not out.is_contiguous():
        raise ValueError("moe_gemm_dgelu_: out must be contiguous (it is written in place)")
    if dy.device.type == "cuda":
        _ext.moe_gemm_dgelu(dy.contiguous(), w2.contiguous(), aux.contiguous(), out)
    else:
        out.copy_(gemm_dgelu_emulated(dy, w2, aux))


class _MoEExt(torch.autograd.Function):
    """The whole layer with a hand-written backward (the compiled kernels between torch GEMMs).

    What it saves over autograd through the same kernels: the GELU is applied in place with its
    derivative stored instead of the pre-activation (the backward multiplies, never re-evaluates
    erf), the activation's buffer is reused for its own gradient, and the router's backward is
    a sparse scatter plus two small GEMMs. Reusing the saved activation means a second backward
    through the same graph fails (autograd's version check) instead of computing garbage.

    With `epilogue` the GELU runs in the GEMMs' cuBLASLt epilogues instead (tanh form): the
    forward saves the pre-activation the epilogue wrote, and the backward's GEMM applies the
    derivative from it, so neither pass has an elementwise kernel of its own.
    """

    @staticmethod
    def forward(ctx, x, gate_weight, w1, w2, k, epilogue=False):
        B, T, d = x.shape
        E = w1.shape[0]
        probs, gates, idx = route(x, gate_weight, k)  # (B, T, E), (B, E, k), (B, E, k)
        inv = moe_inverse_ext(idx, T)  # (B, T, E)
        xin = moe_dispatch_ext(x, idx, inv).view(E, B * k, d)  # (E, B*k, d)
        if epilogue:
            act, slope = moe_gemm_gelu_aux_ext(xin, w1)  # gelu_tanh(pre-activation); slope: the pre-activation
        else:
            act = torch.bmm(xin, w1)  # (E, B*k, hidden), pre-activation
            slope = moe_gelu_ext_(act)  # act is now gelu(pre-activation); slope its derivative
        y = torch.bmm(act, w2).view(E, B, k, d)  # (E, B, k, d)
        ctx.save_for_backward(x, gate_weight, w1, w2, probs, gates, idx, inv, xin, act, slope, y)
        ctx.epilogue = epilogue
        return moe_combine_ext(y, gates, idx, inv)  # (B, T, d)

    @staticmethod
    def backward(ctx, grad):
        x, gate_weight, w1, w2, probs, gates, idx, inv, xin, act, slope, y = ctx.saved_tensors
        B, T, d = x.shape
        E, _, k, _ = y.shape
        need_x, need_gate, need_w1, need_w2 = ctx.needs_input_grad[:4]
        dy, dgates = moe_combine_backward_ext(grad.contiguous(), y, gates, idx)  # (E, B, k, d), (B, E, k)
        dy = dy.view(E, B * k, d)
        dw2 = torch.bmm(act.transpose(1, 2), dy) if need_w2 else None  # (E, hidden, d)
        # (E, B*k, hidden), in act's buffer
        if ctx.epilogue:
            moe_gemm_dgelu_ext_(dy, w2, slope, act)
            dh = act
        else:
            dh = torch.bmm(dy, w2.transpose(1, 2), out=act).mul_(slope)
        dw1 = torch.bmm(xin.transpose(1, 2), dh) if need_w1 else None  # (E, d, hidden)
        dx = dgate = None
        if need_x or need_gate:
            # Router: d probs is nonzero only where an expert chose the token.
            dprobs = torch.zeros(B, E, T, dtype=probs.dtype, device=probs.device)
            dprobs = dprobs.scatter_(2, idx, dgates).transpose(1, 2)  # (B, T, E)
            dlogits = softmax_backward(dprobs, probs).reshape(B * T, E)
            if need_gate:
                dgate = dlogits.t().mm(x.reshape(B * T, d))  # (E, d)
            if need_x:
                dxin = torch.bmm(dh, w1.transpose(1, 2)).view(E, B, k, d)  # (E, B, k, d)
                dx = moe_combine_ext(dxin, None, idx, inv)  # (B, T, d)
                dx.view(B * T, d).addmm_(dlogits, gate_weight)
        return dx, dgate, dw1, dw2, None, None


def _common_dtype(x, gate_weight, w1, w2):
    """The inputs in one dtype: autocast's where it is on (as the reference's matmuls would run),
    else x's. Kernels below run with autocast off; autograd casts the gradients back."""
    dev = x.device.type
    dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
    return tuple(t.to(dtype) for t in (x, gate_weight, w1, w2))


def moe_ext(x, gate_weight, w1, w2, capacity):
    """Compiled dispatch into per-expert blocks, batched expert GEMMs with the GELU applied in
    place, deterministic combine; one autograd node for the layer."""
    k = expert_capacity(x.shape[1], w1.shape[0], capacity)
    args = _common_dtype(x, gate_weight, w1, w2)
    with torch.autocast(x.device.type, enabled=False):
        return _MoEExt.apply(*args, k)


moe_op.register("cuda", 30, extension_cuda_reasons, _ext.supports("cuda"))(moe_ext)
moe_op.register("cpp", 20, extension_reasons, _ext.supports("cpu"))(moe_ext)


def moe_ext_epilogue(x, gate_weight, w1, w2, capacity):
    """moe_ext with the GELU (tanh form) in the expert GEMMs' cuBLASLt epilogues."""
    k = expert_capacity(x.shape[1], w1.shape[0], capacity)
    args = _common_dtype(x, gate_weight, w1, w2)
    with torch.autocast(x.device.type, enabled=False):
        return _MoEExt.apply(*args, k, True)


def _cublaslt_reasons() -> list[str]:
    return extension_cuda_reasons() + _ext.cublaslt_reasons()


def _cublaslt_supports(x, gate_weight, w1, w2, capacity) -> list[str]:
    reasons = []
    if x.device.type != "cuda":
        reasons.append(f"tensor on {x.device.type}, this backend runs on cuda")
    dev = x.device.type
    dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
    if dtype not in _ext.LT_DTYPES:
        reasons.append(f"computes in {dtype}: cuBLASLt's GELU epilogue is the tanh form, up to "
                       f"{TANH_GELU_MAX_ERROR} from the published GELU, inside the rounding of bf16 and fp16 "
                       "activations only (use bf16 autocast, or the exact `cuda` backend)")
    if w1.shape[-1] % 8:
        reasons.append(f"hidden size {w1.shape[-1]} is not a multiple of 8 (the epilogue buffer's stride)")
    return reasons


# Below `cuda`: chosen only when asked for (backend="cublaslt" or MICRODIT_BACKEND=moe=cublaslt),
# since its GELU is not the published one and no GPU run has yet measured it against `cuda`.
moe_op.register("cublaslt", 28, _cublaslt_reasons, _cublaslt_supports)(moe_ext_epilogue)


def expert_choice_moe(x, gate_weight, w1, w2, capacity: float, backend=None) -> torch.Tensor:
    """(B, T, d) -> (B, T, d). gate_weight (E, d), w1 (E, d, hidden), w2 (E, hidden, d)."""
    return moe_op(x, gate_weight, w1, w2, capacity, backend=backend)


# ---------------------------------------------------------------- Triton (kernels/moe.py)
# The whole layer is one custom op: router softmax + top-k, the dispatch fused into the first
# grouped GEMM's operand load with the GELU in its epilogue, the second grouped GEMM, and the
# deterministic combine; its backward is another (the GELU's backward in a GEMM epilogue, the
# weight gradients as grouped GEMMs over all samples). The forward returns what the backward
# needs, because a custom op's autograd can save only its inputs and outputs.
def _triton_kernels():
    from microdit.kernels import moe as kernels  # imports triton: only when used

    return kernels


@torch.library.custom_op("microdit::moe_triton", mutates_args=())
def moe_triton_fwd(x: torch.Tensor, gate_weight: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor,
                   k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                    torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out, probs, gates, idx, inv, act, dgelu, y): the layer's output, then saved tensors."""
    return tuple(_triton_kernels().moe_fwd(x, gate_weight, w1.contiguous(), w2.contiguous(), k))


@moe_triton_fwd.register_fake
def _(x, gate_weight, w1, w2, k):
    B, T, d = x.shape
    E, _, hidden = w1.shape
    new = x.new_empty
    return (new(B, T, d), new(B, T, E), new(B, E, k), new(B, E, k, dtype=torch.int64),
            new(B, T, E, dtype=torch.int32), new(E, B * k, hidden), new(E, B * k, hidden), new(E, B * k, d))


@torch.library.custom_op("microdit::moe_triton_backward", mutates_args=())
def moe_triton_bwd(grad: torch.Tensor, x: torch.Tensor, gate_weight: torch.Tensor, w1: torch.Tensor,
                   w2: torch.Tensor, probs: torch.Tensor, gates: torch.Tensor, idx: torch.Tensor,
                   inv: torch.Tensor, act: torch.Tensor, dgelu: torch.Tensor,
                   y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dgate_weight, dw1, dw2) from the output's gradient and moe_triton's saved tensors."""
    return tuple(_triton_kernels().moe_bwd(grad, x, gate_weight, w1.contiguous(), w2.contiguous(), probs,
                                           gates, idx, inv, act, dgelu, y))


@moe_triton_bwd.register_fake
def _(grad, x, gate_weight, w1, w2, probs, gates, idx, inv, act, dgelu, y):
    return torch.empty_like(x), torch.empty_like(gate_weight), torch.empty_like(w1), torch.empty_like(w2)


def _moe_triton_setup(ctx, inputs, output):
    x, gate_weight, w1, w2, _ = inputs
    ctx.save_for_backward(x, gate_weight, w1, w2, *output[1:])


def _moe_triton_backward(ctx, grad, *unused):
    dx, dgate, dw1, dw2 = moe_triton_bwd(grad, *ctx.saved_tensors)
    return dx, dgate, dw1, dw2, None


moe_triton_fwd.register_autograd(_moe_triton_backward, setup_context=_moe_triton_setup)


def moe_triton(x, gate_weight, w1, w2, capacity):
    """Triton kernels throughout: router, fused dispatch-GEMM-GELU, GEMM, deterministic combine."""
    k = expert_capacity(x.shape[1], w1.shape[0], capacity)
    args = _common_dtype(x, gate_weight, w1, w2)
    with torch.autocast(x.device.type, enabled=False):
        return moe_triton_fwd(*args, k)[0]


def _triton_supports(x, gate_weight, w1, w2, capacity):
    reasons = []
    if x.device.type == "cpu" and x.dtype != torch.float32:
        reasons.append(f"dtype {x.dtype} on the CPU (the Triton interpreter runs float32 only)")
    elif x.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
        reasons.append("autocast on the CPU (the Triton interpreter runs float32 only)")
    elif x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        reasons.append(f"dtype {x.dtype} not supported (supported: fp32, fp16, bf16)")
    reasons += triton_device_reasons(x.device.type)
    return reasons


moe_op.register("triton", 25, triton_available_reasons, _triton_supports)(moe_triton)
