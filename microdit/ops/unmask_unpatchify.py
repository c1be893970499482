"""unmask_unpatchify: (B, K, p*p*C) -> (B, C, H, W), un-mask with `mask_token` and un-patchify.

Equals unpatchify(unmask_tokens(...)). reference and torch compose the two; cpp / cuda run the
compiled un-mask (ops/token_rows.py) then `unpatchify`; triton does both in one pass over the
output (kernels/unmask_unpatchify.py), its backward gathering the kept tokens' patches straight
from the image gradient.
"""
from __future__ import annotations

import torch

from .. import _ext
from ..availability import triton_available_reasons
from .registry import Op
from .token_rows import (EXTENSION_BACKENDS, fill_grad, fill_vector, setup_gather, setup_scatter, triton_kernels,
                         triton_token_supports, unmask_tokens_ext)
from .unmask_tokens import unmask_tokens_reference, unmask_tokens_torch

unmask_unpatchify_op = Op("unmask_unpatchify",
                          "(B, K, p*p*C) -> (B, C, H, W): un-mask with mask_token and un-patchify in one pass")


def unpatchify(x: torch.Tensor, grid_h: int, grid_w: int, patch: int, channels: int) -> torch.Tensor:
    """(B, T, p*p*C), per-token layout (row, column, channel) -> (B, C, grid_h*p, grid_w*p), as
    MicroDiT's unpatchify."""
    x = x.reshape(x.shape[0], grid_h, grid_w, patch, patch, channels)
    return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], channels, grid_h * patch, grid_w * patch)


@unmask_unpatchify_op.register("reference", priority=0)
def unmask_unpatchify_reference(x, ids_keep, num_tokens, mask_token, grid_h, grid_w, patch, channels):
    """The published composition: un-mask (concatenate + gather), then un-patchify."""
    return unpatchify(unmask_tokens_reference(x, ids_keep, num_tokens, mask_token), grid_h, grid_w, patch, channels)


@unmask_unpatchify_op.register("torch", priority=10)
def unmask_unpatchify_torch(x, ids_keep, num_tokens, mask_token, grid_h, grid_w, patch, channels):
    return unpatchify(unmask_tokens_torch(x, ids_keep, num_tokens, mask_token), grid_h, grid_w, patch, channels)


def unmask_unpatchify_ext(x, ids_keep, num_tokens, mask_token, grid_h, grid_w, patch, channels):
    """The compiled un-mask (one pass, every output row written once), then `unpatchify`."""
    return unpatchify(unmask_tokens_ext(x, ids_keep, num_tokens, mask_token), grid_h, grid_w, patch, channels)


for _name, _prio, _avail, _dev in EXTENSION_BACKENDS:
    unmask_unpatchify_op.register(_name, _prio, _avail, _ext.supports(_dev))(unmask_unpatchify_ext)


# ---------------------------------------------------------------- Triton (kernels/unmask_unpatchify.py)
@torch.library.custom_op("microdit::triton_unmask_unpatchify", mutates_args=())
def unmask_unpatchify_triton(x: torch.Tensor, idx: torch.Tensor, num_tokens: int, fill: torch.Tensor | None,
                             grid_h: int, grid_w: int, patch: int, channels: int) -> torch.Tensor:
    """(B, K, p*p*C) -> (B, C, grid_h*p, grid_w*p) in one pass over the output."""
    inv = triton_kernels("token_rows").inverse_fwd(idx.contiguous(), num_tokens)
    return triton_kernels("unmask_unpatchify").unmask_unpatchify_fwd(
        x.contiguous(), inv, fill_vector(fill, x.dtype), grid_h, grid_w, patch, channels)


@unmask_unpatchify_triton.register_fake
def _(x, idx, num_tokens, fill, grid_h, grid_w, patch, channels):
    return x.new_empty(x.shape[0], channels, grid_h * patch, grid_w * patch)


@torch.library.custom_op("microdit::triton_gather_image", mutates_args=())
def gather_image_triton(img: torch.Tensor, idx: torch.Tensor, grid_w: int, patch: int) -> torch.Tensor:
    """(B, C, H, W), (B, K) -> (B, K, p*p*C): the patches of the kept tokens (the fused op's backward)."""
    return triton_kernels("unmask_unpatchify").gather_image_fwd(img.contiguous(), idx.contiguous(), grid_w, patch)


@gather_image_triton.register_fake
def _(img, idx, grid_w, patch):
    return img.new_empty(img.shape[0], idx.shape[1], patch * patch * img.shape[1])


def _unmask_unpatchify_triton_bwd(ctx, grad):
    (idx,) = ctx.saved_tensors
    _, grid_w, patch, _ = ctx.grid
    dx = gather_image_triton(grad, idx, grid_w, patch)
    return dx, None, None, fill_grad(ctx, grad, idx, grid_w, patch), None, None, None, None


def _gather_image_triton_bwd(ctx, grad):
    (idx,) = ctx.saved_tensors
    grid_w, patch = ctx.rest
    _, channels, H, _ = ctx.src_shape
    grid_h = H // patch
    img = unmask_unpatchify_triton(grad, idx, grid_h * grid_w, None, grid_h, grid_w, patch, channels)
    return img, None, None, None


unmask_unpatchify_triton.register_autograd(_unmask_unpatchify_triton_bwd, setup_context=setup_scatter)
gather_image_triton.register_autograd(_gather_image_triton_bwd, setup_context=setup_gather)
unmask_unpatchify_op.register("triton", 25, triton_available_reasons, triton_token_supports)(unmask_unpatchify_triton)


def unmask_unpatchify(x, ids_keep, num_tokens: int, mask_token, grid_h: int, grid_w: int, patch: int,
                      channels: int, backend=None) -> torch.Tensor:
    """(B, K, p*p*C) -> (B, C, grid_h*p, grid_w*p): equals
    unpatchify(unmask_tokens(x, ids_keep, num_tokens, mask_token)), in one pass where fused."""
    if grid_h * grid_w != num_tokens or x.shape[-1] != patch * patch * channels:
        raise ValueError(f"unmask_unpatchify: a {grid_h}x{grid_w} grid of {patch}x{patch}x{channels} patches "
                         f"needs num_tokens = {grid_h * grid_w} and {patch * patch * channels} features, "
                         f"got {num_tokens} and {x.shape[-1]}")
    return unmask_unpatchify_op(x, ids_keep, num_tokens, mask_token, grid_h, grid_w, patch, channels,
                                backend=backend)
