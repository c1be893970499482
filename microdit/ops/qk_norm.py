"""QK-LayerNorm: LN0 (no weight, no bias) of q or k over the whole attention width h (all heads
together, as the published layers do), then the (B, N, H, hd) layout the attention op takes.

x (B, N, h), rows possibly strided (q, k and v are slices of one qkv GEMM output). Backends:
- reference: `F.layer_norm` then a view, as the published layers compute it. Under autocast
  LayerNorm runs and writes float32 (it is on autocast's float32 list), and the attention
  backend then casts that copy to bf16: two extra passes over a float32 tensor.
- triton: kernels/qk_norm.py, one kernel reads the strided rows where the GEMM left them and
  writes the normalised rows in autocast's dtype (bf16 straight from the kernel); one kernel
  backward from x and the saved per-row mean and 1/std.
The automatic choice is triton where it runs (a CUDA device), else reference.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..availability import triton_available_reasons
from .ln_modulate import _out_dtype, triton_supports  # autocast's output dtype; one row per program
from .registry import Op

qk_norm_op = Op("qk_norm", "LN0 of q or k over all heads, into the (B, N, H, hd) attention layout, autocast's dtype")


def check_inputs(x, heads):
    """Readable errors for x that is not (B, N, h) with h a multiple of `heads`."""
    if x.dim() != 3:
        raise ValueError(f"qk_norm: x must be (B, N, h), got {tuple(x.shape)}")
    if heads < 1 or x.shape[-1] % heads:
        raise ValueError(f"qk_norm: width h={x.shape[-1]} is not a multiple of heads={heads}")


@qk_norm_op.register("reference", priority=0)
def qk_norm_reference(x, heads, eps):
    """Published: LayerNorm over h without affine parameters, then split the heads."""
    check_inputs(x, heads)
    B, N, h = x.shape
    return F.layer_norm(x, (h,), None, None, eps).view(B, N, heads, h // heads)


# ---------------------------------------------------------------- Triton
def triton_kernels():
    from microdit.kernels import qk_norm as kernels  # imports triton: only when used

    return kernels


def _rows(x):
    """x itself where its columns are unit-stride (the kernels read strided rows), else a copy."""
    return x if x.stride(-1) == 1 else x.contiguous()


@torch.library.custom_op("microdit::triton_qk_norm", mutates_args=())
def qk_norm_triton_op(x: torch.Tensor, eps: float, out_dtype: torch.dtype
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return triton_kernels().qk_norm_fwd(_rows(x), eps, out_dtype)


@qk_norm_triton_op.register_fake
def _(x, eps, out_dtype):
    B, N, _ = x.shape
    stats = x.new_empty(B, N, dtype=torch.float32)
    return x.new_empty(x.shape, dtype=out_dtype), stats, torch.empty_like(stats)


@torch.library.custom_op("microdit::triton_qk_norm_backward", mutates_args=())
def qk_norm_triton_backward(dy: torch.Tensor, x: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor) -> torch.Tensor:
    return triton_kernels().qk_norm_bwd(dy.contiguous(), _rows(x), mean, rstd)


@qk_norm_triton_backward.register_fake
def _(dy, x, mean, rstd):
    return x.new_empty(x.shape)


def _setup(ctx, inputs, output):
    x, _, _ = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, mean, rstd)
    ctx.mark_non_differentiable(mean, rstd)


def _backward(ctx, dy, _dmean, _drstd):
    x, mean, rstd = ctx.saved_tensors
    return qk_norm_triton_backward(dy, x, mean, rstd), None, None


qk_norm_triton_op.register_autograd(_backward, setup_context=_setup)


@qk_norm_op.register("triton", priority=20, available=triton_available_reasons, supports=triton_supports)
def qk_norm_triton(x, heads, eps):
    check_inputs(x, heads)
    B, N, h = x.shape
    return qk_norm_triton_op(x, eps, _out_dtype(x))[0].view(B, N, heads, h // heads)


def qk_norm(x, heads, eps, backend=None):
    """(B, N, h) -> (B, N, H, h / H): LayerNorm over h (no weight, no bias), heads split."""
    return qk_norm_op(x, heads, eps, backend=backend)
