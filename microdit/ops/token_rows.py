"""Row-copy custom ops shared by the token ops mask_tokens, unmask_tokens and unmask_unpatchify.

Each op's public function, reference and backend registrations live in its own module
(ops/mask_tokens.py, ops/unmask_tokens.py, ops/unmask_unpatchify.py). What lives here are the
torch.library custom ops over the compiled extension (microdit._C, csrc/mask_tokens/ and
csrc/unmask_tokens/) and over the Triton launchers (kernels/mask_tokens.py,
kernels/unmask_tokens.py): they are each other's backward (the gather's backward is the
zero-filled scatter and the scatter's is the gather, exact because indices are unique per
sample), so they are defined together. Fake and autograd registrations let them trace under
torch.compile.
"""
from __future__ import annotations

import torch

from .. import _ext
from ..availability import extension_cuda_reasons, extension_reasons, triton_device_reasons
from .keep_indices import drop_mask

# (backend, priority, availability check, device) of the compiled extension's two backends.
EXTENSION_BACKENDS = (("cuda", 30, extension_cuda_reasons, "cuda"), ("cpp", 20, extension_reasons, "cpu"))


# ---------------------------------------------------------------- compiled kernels (microdit._C)
@torch.library.custom_op("microdit::mask_tokens", mutates_args=())
def mask_tokens_ext(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """(B, T, D), (B, K) -> (B, K, D) through the compiled extension."""
    return _ext.mask_tokens(x.contiguous(), idx.contiguous())


@mask_tokens_ext.register_fake
def _(x, idx):
    return x.new_empty(x.shape[0], idx.shape[1], x.shape[2])


@torch.library.custom_op("microdit::unmask_tokens", mutates_args=())
def unmask_tokens_ext(x: torch.Tensor, idx: torch.Tensor, num_tokens: int, fill: torch.Tensor | None) -> torch.Tensor:
    """(B, K, P) -> (B, T, P): rows to `idx`, `fill` (P elements) or zeros elsewhere."""
    return _ext.unmask_tokens(x.contiguous(), idx.contiguous(), num_tokens, fill=fill_vector(fill, x.dtype))


@unmask_tokens_ext.register_fake
def _(x, idx, num_tokens, fill):
    return x.new_empty(x.shape[0], num_tokens, x.shape[2])


def _mask_ext_bwd(ctx, grad):
    (idx,) = ctx.saved_tensors
    return unmask_tokens_ext(grad, idx, ctx.src_shape[1], None), None


def _unmask_ext_bwd(ctx, grad):
    (idx,) = ctx.saved_tensors
    grad_fill = None
    if ctx.fill_meta is not None and ctx.needs_input_grad[3]:
        shape, dtype = ctx.fill_meta
        dropped = drop_mask(idx, grad.shape[1]).to(grad.dtype).unsqueeze(-1)  # (B, T, 1)
        grad_fill = (grad * dropped).sum(dim=(0, 1)).reshape(shape).to(dtype)
    return mask_tokens_ext(grad, idx), None, None, grad_fill


def setup_gather(ctx, inputs, output):
    """Autograd context of a gather: (src, idx, *rest) -> saves idx, src's shape and the rest."""
    src, idx, *rest = inputs  # (x, idx) or (img, idx, grid_w, patch)
    ctx.save_for_backward(idx)
    ctx.src_shape, ctx.rest = src.shape, rest


def setup_scatter(ctx, inputs, output):
    """Autograd context of a scatter: (x, idx, num_tokens, fill, *grid) -> saves idx and the rest."""
    x, idx, num_tokens, fill, *grid = inputs  # grid: (grid_h, grid_w, patch, channels) if fused
    ctx.save_for_backward(idx)
    ctx.num_tokens, ctx.grid = num_tokens, grid
    ctx.fill_meta = None if fill is None else (fill.shape, fill.dtype)


mask_tokens_ext.register_autograd(_mask_ext_bwd, setup_context=setup_gather)
unmask_tokens_ext.register_autograd(_unmask_ext_bwd, setup_context=setup_scatter)


# ---------------------------------------------------------------- Triton
# The backward of each is built from the others, so every gradient is again a custom op.
# Triton is imported only when one of them runs.
def triton_kernels(op: str):
    """The launchers of kernels/<op>.py (imports triton: only when a Triton backend runs)."""
    import importlib

    return importlib.import_module(f"microdit.kernels.{op}")


def fill_vector(fill: torch.Tensor | None, dtype: torch.dtype):
    return None if fill is None else fill.reshape(-1).to(dtype).contiguous()


@torch.library.custom_op("microdit::triton_mask_tokens", mutates_args=())
def mask_tokens_triton(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """(B, T, D), (B, K) -> (B, K, D)."""
    return triton_kernels("mask_tokens").mask_tokens_fwd(x.contiguous(), idx.contiguous())


@mask_tokens_triton.register_fake
def _(x, idx):
    return x.new_empty(x.shape[0], idx.shape[1], x.shape[2])


@torch.library.custom_op("microdit::triton_unmask_tokens", mutates_args=())
def unmask_tokens_triton(x: torch.Tensor, idx: torch.Tensor, num_tokens: int, fill: torch.Tensor | None) -> torch.Tensor:
    """(B, K, P) -> (B, T, P): rows to `idx`, `fill` (P elements) or zeros elsewhere."""
    rows = triton_kernels("token_rows")
    inv = rows.inverse_fwd(idx.contiguous(), num_tokens)
    return triton_kernels("unmask_tokens").unmask_tokens_fwd(x.contiguous(), inv, fill_vector(fill, x.dtype))


@unmask_tokens_triton.register_fake
def _(x, idx, num_tokens, fill):
    return x.new_empty(x.shape[0], num_tokens, x.shape[2])


@torch.library.custom_op("microdit::triton_dropped_sum", mutates_args=())
def dropped_sum_triton(src: torch.Tensor, idx: torch.Tensor, num_tokens: int, grid_w: int, patch: int) -> torch.Tensor:
    """(F,) float32 (float64 for float64 `src`): the sum over all samples' dropped tokens of
    (B, T, F) rows, or of the patches of a (B, C, H, W) image (tokens on a grid `grid_w` wide)."""
    rows = triton_kernels("token_rows")
    return rows.dropped_sum_fwd(src.contiguous(), rows.inverse_fwd(idx.contiguous(), num_tokens), grid_w, patch)


@dropped_sum_triton.register_fake
def _(src, idx, num_tokens, grid_w, patch):
    F = src.shape[2] if src.dim() == 3 else patch * patch * src.shape[1]
    return src.new_empty(F, dtype=torch.float64 if src.dtype == torch.float64 else torch.float32)


def fill_grad(ctx, grad, idx, grid_w=1, patch=1):
    """mask_token's gradient: the sum of the output gradient over dropped tokens."""
    if ctx.fill_meta is None or not ctx.needs_input_grad[3]:
        return None
    shape, dtype = ctx.fill_meta
    return dropped_sum_triton(grad, idx, ctx.num_tokens, grid_w, patch).reshape(shape).to(dtype)


def _mask_triton_bwd(ctx, grad):
    (idx,) = ctx.saved_tensors
    return unmask_tokens_triton(grad, idx, ctx.src_shape[1], None), None


def _unmask_triton_bwd(ctx, grad):
    (idx,) = ctx.saved_tensors
    return mask_tokens_triton(grad, idx), None, None, fill_grad(ctx, grad, idx)


mask_tokens_triton.register_autograd(_mask_triton_bwd, setup_context=setup_gather)
unmask_tokens_triton.register_autograd(_unmask_triton_bwd, setup_context=setup_scatter)


def triton_token_supports(x, *args, **kwargs):
    """The Triton token backends' `supports` check: dtype and device of the tokens `x`."""
    reasons = []
    if x.device.type == "cpu" and x.dtype != torch.float32:
        reasons.append(f"dtype {x.dtype} on the CPU (the Triton interpreter runs float32 only)")
    elif x.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        reasons.append(f"dtype {x.dtype} not supported (supported: fp32, fp16, bf16, fp64)")
    return reasons + triton_device_reasons(x.device.type)
