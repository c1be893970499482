"""Scaled dot-product attention on the (B, N, H, head_dim) layout the attention layers produce.

softmax(q k^T / sqrt(head_dim)) v per head, no mask, no dropout: what the published code
computes through one `F.scaled_dot_product_attention` call. Backends:
- reference: that formula written out in plain PyTorch (the oracle; any device, any dtype).
- sdpa: `F.scaled_dot_product_attention` with its kernel pinned by `sdpa_kernel` (flash, then
  memory-efficient, then math). cuDNN attention is left out: it is reported to give NaN
  gradients in diffusion training. `sdpa_cudnn` puts it first, for those who want it.
- flash_attn: flash-attn 2.x `flash_attn_func`, or FlashAttention-3's on Hopper where installed.
  Both take (B, N, H, hd) as it is, so no transposes.
- xformers: `memory_efficient_attention` (also (B, N, H, hd) as it is).
- transformer_engine: `te.DotProductAttention` in the bshd format; under Transformer Engine's
  `fp8_autocast` with a recipe that sets `fp8_dpa` (see microdit.fp8) it runs in FP8.
The automatic choice is sdpa: the library backends have not been measured on a device class
yet (benches/bench_attention.py), so they run where chosen (`backends: {attention: flash_attn}`).
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from .. import availability
from .registry import Op

attention_op = Op("attention", "(B, N, H, hd) x (B, L, H, hd) x (B, L, H, hd) -> (B, N, H, hd): softmax(q k^T / sqrt(hd)) v")

_HALF = (torch.float16, torch.bfloat16)


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype attention runs in: autocast's where autocast is on (as SDPA does), else the input's."""
    if torch.is_autocast_enabled(t.device.type):
        return torch.get_autocast_dtype(t.device.type)
    return t.dtype


def check_shapes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Readable errors for inputs that are not (B, N, H, hd), (B, L, H, hd), (B, L, H, hd)."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"attention takes q, k, v of shape (B, N, H, head_dim); got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    if k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
        raise ValueError(f"attention: k and v must be (B, L, H, head_dim) matching q's B, H, head_dim; got "
                         f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")


@attention_op.register("reference", priority=0)
def attention_reference(q, k, v):
    """softmax(q k^T / sqrt(hd)) v, per batch and head, in the inputs' dtype."""
    check_shapes(q, k, v)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, N, hd), (B, H, L, hd)
    scores = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5  # (B, H, N, L)
    return (scores.softmax(dim=-1) @ v).transpose(1, 2)  # (B, N, H, hd)


def _sdpa(q, k, v, backends):
    check_shapes(q, k, v)
    with sdpa_kernel(backends, set_priority=True):
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return o.transpose(1, 2)  # (B, N, H, hd)


# Flash first, then memory-efficient, then math (which runs anything): a pinned, reproducible
# order, with cuDNN attention out of both the forward and the backward.
SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
SDPA_CUDNN_BACKENDS = [SDPBackend.CUDNN_ATTENTION] + SDPA_BACKENDS


@attention_op.register("sdpa", priority=40)
def attention_sdpa(q, k, v):
    """torch SDPA on transposed views (no copies), kernels pinned, cuDNN excluded."""
    return _sdpa(q, k, v, SDPA_BACKENDS)


@attention_op.register("sdpa_cudnn", priority=5)
def attention_sdpa_cudnn(q, k, v):
    """torch SDPA with cuDNN attention allowed first (forward and backward)."""
    return _sdpa(q, k, v, SDPA_CUDNN_BACKENDS)


def _cuda_half_reasons(q, k, v, max_head_dim=256) -> list[str]:
    reasons = []
    if q.device.type != "cuda":
        reasons.append(f"inputs on {q.device.type}; this backend runs on CUDA tensors")
    dt = compute_dtype(q)
    if dt not in _HALF:
        reasons.append(f"dtype {dt} not supported (supported: float16, bfloat16; use autocast)")
    hd = q.shape[-1]
    if hd % 8 or hd > max_head_dim:
        reasons.append(f"head_dim {hd} not supported (a multiple of 8, at most {max_head_dim})")
    return reasons


def _half(q, k, v):
    """q, k, v in the compute dtype (under autocast the QK-LayerNorm leaves q, k in float32)."""
    dt = compute_dtype(q)
    return tuple(t if t.dtype == dt else t.to(dt) for t in (q, k, v))


def _flash_reasons() -> list[str]:
    if not availability.flash_attn_reasons() or not availability.flash_attn3_reasons():
        return []
    return availability.flash_attn_reasons()


@attention_op.register("flash_attn", priority=30, available=_flash_reasons, supports=_cuda_half_reasons)
def attention_flash(q, k, v):
    """FlashAttention-3 on Hopper where installed, else flash-attn 2.x."""
    q, k, v = _half(q, k, v)
    if not availability.flash_attn3_reasons():
        o = availability.flash_attn_interface().flash_attn_func(q, k, v)
        return o[0] if isinstance(o, tuple) else o  # some FA3 releases also return the log-sum-exp
    return availability.flash_attn().flash_attn_func(q, k, v)


@attention_op.register("xformers", priority=20, available=availability.xformers_reasons, supports=_cuda_half_reasons)
def attention_xformers(q, k, v):
    q, k, v = _half(q, k, v)
    return availability.xformers_ops().memory_efficient_attention(q, k, v)


@functools.cache
def _te_attention(heads: int, head_dim: int):
    """One te.DotProductAttention per (heads, head_dim) (it holds no parameters, only FP8 state)."""
    te = availability.transformer_engine()
    return te.DotProductAttention(heads, head_dim, qkv_format="bshd", attn_mask_type="no_mask",
                                  attention_dropout=0.0)


@attention_op.register("transformer_engine", priority=25, available=availability.transformer_engine_reasons,
                       supports=_cuda_half_reasons)
def attention_transformer_engine(q, k, v):
    B, N, H, hd = q.shape
    q, k, v = _half(q, k, v)
    return _te_attention(H, hd)(q, k, v).view(B, N, H, hd)  # TE returns (B, N, H * hd)


def attention(q, k, v, backend=None):
    """(B, N, H, hd) attention of q over (B, L, H, hd) keys and values; returns (B, N, H, hd)."""
    return attention_op(q, k, v, backend=backend)
