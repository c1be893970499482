"""Token masking: random keep indices, select kept tokens, and un-mask with `mask_token`.

The reference backend computes what the published MicroDiT code computes, the same way:
uniform noise + full argsort for the keep indices, `torch.gather` with an expanded index to
mask, and concatenate-with-mask-tokens-then-gather-by-`ids_restore` to un-mask. Other
backends: torch (row indexing, partial top-k), cpp / cuda (microdit._C row copies) and triton
(kernels/token_mask.py: row copies through an inverse map, un-mask fused with un-patchify,
keep indices by counting ranks instead of sorting).
"""
from __future__ import annotations

import torch

from .. import _ext
from ..availability import extension_cuda_reasons, extension_reasons, triton_available_reasons, triton_device_reasons
from .registry import Op

keep_indices_op = Op("keep_indices", "per-sample random subset of kept token indices, in random order")
mask_tokens_op = Op("mask_tokens", "(B, T, D) -> (B, K, D): select kept tokens")
unmask_tokens_op = Op("unmask_tokens", "(B, K, P) -> (B, T, P): put kept tokens back, fill mask_token")


def num_kept(num_tokens: int, mask_ratio: float) -> int:
    """Kept tokens per sample, as the published code counts them."""
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
    return int(num_tokens * (1 - mask_ratio))


# ---------------------------------------------------------------- keep indices
@keep_indices_op.register("reference", priority=0)
def keep_indices_reference(batch, num_tokens, mask_ratio, device=None, generator=None):
    """First `K` of a per-sample argsort of uniforms: a uniformly random subset in random order."""
    noise = torch.rand(batch, num_tokens, device=device, generator=generator)
    ids_shuffle = torch.argsort(noise, dim=1)
    return ids_shuffle[:, : num_kept(num_tokens, mask_ratio)]


@keep_indices_op.register("torch", priority=10)
def keep_indices_torch(batch, num_tokens, mask_ratio, device=None, generator=None):
    """The same indices as the reference from the same noise, by a partial top-k (no full sort)."""
    noise = torch.rand(batch, num_tokens, device=device, generator=generator)
    k = num_kept(num_tokens, mask_ratio)
    # topk(sorted=True, largest=False) returns the k smallest in ascending order, which is
    # exactly the first k entries of the argsort; ties have probability zero.
    return torch.topk(noise, k, dim=1, largest=False, sorted=True).indices


def keep_indices(batch, num_tokens, mask_ratio, device=None, generator=None, backend=None):
    """(B, K) int64 kept-token indices, K = int(T * (1 - mask_ratio))."""
    return keep_indices_op(batch, num_tokens, mask_ratio, device, generator, backend=backend)


def drop_mask(ids_keep: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """(B, T) float mask, 1 where a token was dropped, as the published code returns it."""
    mask = torch.ones(ids_keep.shape[0], num_tokens, device=ids_keep.device)
    mask.scatter_(1, ids_keep, 0.0)
    return mask


def check_ids_keep(ids_keep: torch.Tensor, batch: int, num_tokens: int) -> None:
    """Readable errors for a malformed `ids_keep` (a host-device sync: call outside hot paths)."""
    if ids_keep.dim() != 2 or ids_keep.shape[0] != batch:
        raise ValueError(f"ids_keep must have shape (B={batch}, K), got {tuple(ids_keep.shape)}")
    if ids_keep.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"ids_keep must be an integer tensor, got {ids_keep.dtype}")
    if ids_keep.shape[1] > num_tokens:
        raise ValueError(f"ids_keep keeps {ids_keep.shape[1]} tokens of only {num_tokens}")
    if ids_keep.numel() and (ids_keep.min() < 0 or ids_keep.max() >= num_tokens):
        raise ValueError(f"ids_keep has indices outside [0, {num_tokens})")
    s = ids_keep.sort(dim=1).values
    if s.shape[1] > 1 and bool((s[:, 1:] == s[:, :-1]).any()):
        raise ValueError("ids_keep repeats an index within a sample")


# ---------------------------------------------------------------- mask (gather)
@mask_tokens_op.register("reference", priority=0)
def mask_tokens_reference(x, ids_keep):
    """Published: gather with the index expanded over the feature dim."""
    return torch.gather(x, dim=1, index=ids_keep.unsqueeze(-1).repeat(1, 1, x.shape[-1]))


@mask_tokens_op.register("torch", priority=10)
def mask_tokens_torch(x, ids_keep):
    """Row gather by advanced indexing: no (B, K, D) index tensor is materialised."""
    rows = torch.arange(x.shape[0], device=x.device).unsqueeze(1)
    return x[rows, ids_keep]


def mask_tokens(x: torch.Tensor, ids_keep: torch.Tensor, backend=None) -> torch.Tensor:
    """(B, T, D), (B, K) -> (B, K, D): the kept tokens, in the order of `ids_keep`."""
    return mask_tokens_op(x, ids_keep, backend=backend)


# ---------------------------------------------------------------- un-mask (scatter)
def _ids_restore(ids_keep: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """The published code's `ids_restore` for a shuffle that starts with `ids_keep`.

    Which order the dropped tokens take in the shuffle does not change the result (they all
    become `mask_token`), so they are appended in increasing index order.
    """
    dropped = drop_mask(ids_keep, num_tokens).bool()
    rest = torch.arange(num_tokens, device=ids_keep.device).expand(ids_keep.shape[0], -1)[dropped]
    ids_shuffle = torch.cat([ids_keep, rest.view(ids_keep.shape[0], -1)], dim=1)
    return torch.argsort(ids_shuffle, dim=1)


@unmask_tokens_op.register("reference", priority=0)
def unmask_tokens_reference(x, ids_keep, num_tokens, mask_token):
    """Published: append mask tokens, then gather everything back by `ids_restore`."""
    ids_restore = _ids_restore(ids_keep, num_tokens)
    fill = mask_token.repeat(x.shape[0], num_tokens - x.shape[1], 1)
    x_ = torch.cat([x, fill.to(x.dtype)], dim=1)
    return torch.gather(x_, dim=1, index=ids_restore.unsqueeze(-1).repeat(1, 1, x.shape[2]))


@unmask_tokens_op.register("torch", priority=10)
def unmask_tokens_torch(x, ids_keep, num_tokens, mask_token):
    """Fill with `mask_token` and scatter the kept rows: one pass, no argsort."""
    B, _, P = x.shape
    out = mask_token.to(x.dtype).reshape(1, 1, P).expand(B, num_tokens, P).clone()
    rows = torch.arange(B, device=x.device).unsqueeze(1)
    out[rows, ids_keep] = x
    return out


def unmask_tokens(x, ids_keep, num_tokens: int, mask_token, backend=None) -> torch.Tensor:
    """(B, K, P) -> (B, T, P): kept tokens back in place, `mask_token` (1, 1, P) elsewhere."""
    return unmask_tokens_op(x, ids_keep, num_tokens, mask_token, backend=backend)


# ---------------------------------------------------------------- compiled kernels (microdit._C)
# Custom ops with fake and autograd registrations, so they trace under torch.compile. The
# gather's backward is the zero-filled scatter and the scatter's backward is the gather: both
# are pure row copies (indices are unique per sample), so gradients are exact.
@torch.library.custom_op("microdit::gather_tokens", mutates_args=())
def gather_tokens_ext(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """(B, T, D), (B, K) -> (B, K, D) through the compiled extension."""
    return _ext.gather_tokens(x.contiguous(), idx.contiguous())


@gather_tokens_ext.register_fake
def _(x, idx):
    return x.new_empty(x.shape[0], idx.shape[1], x.shape[2])


@torch.library.custom_op("microdit::scatter_tokens", mutates_args=())
def scatter_tokens_ext(x: torch.Tensor, idx: torch.Tensor, num_tokens: int, fill: torch.Tensor | None) -> torch.Tensor:
    """(B, K, P) -> (B, T, P): rows to `idx`, `fill` (P elements) or zeros elsewhere."""
    f = None if fill is None else fill.reshape(-1).to(x.dtype).contiguous()
    return _ext.scatter_tokens(x.contiguous(), idx.contiguous(), num_tokens, fill=f)


@scatter_tokens_ext.register_fake
def _(x, idx, num_tokens, fill):
    return x.new_empty(x.shape[0], num_tokens, x.shape[2])


def _gather_setup(ctx, inputs, output):
    x, idx = inputs
    ctx.save_for_backward(idx)
    ctx.num_tokens = x.shape[1]


def _gather_backward(ctx, grad):
    (idx,) = ctx.saved_tensors
    return scatter_tokens_ext(grad, idx, ctx.num_tokens, None), None


def _scatter_setup(ctx, inputs, output):
    x, idx, num_tokens, fill = inputs
    ctx.save_for_backward(idx)
    ctx.fill_shape = None if fill is None else fill.shape
    ctx.fill_dtype = None if fill is None else fill.dtype


def _scatter_backward(ctx, grad):
    (idx,) = ctx.saved_tensors
    grad_x = gather_tokens_ext(grad, idx)
    grad_fill = None
    if ctx.fill_shape is not None and ctx.needs_input_grad[3]:
        dropped = drop_mask(idx, grad.shape[1]).to(grad.dtype).unsqueeze(-1)  # (B, T, 1)
        grad_fill = (grad * dropped).sum(dim=(0, 1)).reshape(ctx.fill_shape).to(ctx.fill_dtype)
    return grad_x, None, None, grad_fill


gather_tokens_ext.register_autograd(_gather_backward, setup_context=_gather_setup)
scatter_tokens_ext.register_autograd(_scatter_backward, setup_context=_scatter_setup)


for _name, _prio, _avail, _dev in (("cuda", 30, extension_cuda_reasons, "cuda"), ("cpp", 20, extension_reasons, "cpu")):
    mask_tokens_op.register(_name, _prio, _avail, _ext.supports(_dev))(
        lambda x, ids_keep: gather_tokens_ext(x, ids_keep))
    unmask_tokens_op.register(_name, _prio, _avail, _ext.supports(_dev))(
        lambda x, ids_keep, num_tokens, mask_token: scatter_tokens_ext(x, ids_keep, num_tokens, mask_token))


# ---------------------------------------------------------------- un-mask fused with un-patchify
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


for _name, _prio, _avail, _dev in (("cuda", 30, extension_cuda_reasons, "cuda"), ("cpp", 20, extension_reasons, "cpu")):
    unmask_unpatchify_op.register(_name, _prio, _avail, _ext.supports(_dev))(
        lambda x, ids_keep, num_tokens, mask_token, gh, gw, p, c:
        unpatchify(scatter_tokens_ext(x, ids_keep, num_tokens, mask_token), gh, gw, p, c))


# ---------------------------------------------------------------- Triton (kernels/token_mask.py)
# Custom ops over the launchers; the backward of each is built from the others, so every
# gradient is again a custom op (they trace under torch.compile). Triton is imported only
# when one of them runs.
def _triton_kernels():
    from microdit.kernels import token_mask as kernels  # imports triton: only when used

    return kernels


def _fill_vector(fill: torch.Tensor | None, dtype: torch.dtype):
    return None if fill is None else fill.reshape(-1).to(dtype).contiguous()


@torch.library.custom_op("microdit::triton_gather_tokens", mutates_args=())
def gather_tokens_triton(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """(B, T, D), (B, K) -> (B, K, D)."""
    return _triton_kernels().gather_tokens_fwd(x.contiguous(), idx.contiguous())


@gather_tokens_triton.register_fake
def _(x, idx):
    return x.new_empty(x.shape[0], idx.shape[1], x.shape[2])


@torch.library.custom_op("microdit::triton_scatter_tokens", mutates_args=())
def scatter_tokens_triton(x: torch.Tensor, idx: torch.Tensor, num_tokens: int, fill: torch.Tensor | None) -> torch.Tensor:
    """(B, K, P) -> (B, T, P): rows to `idx`, `fill` (P elements) or zeros elsewhere."""
    k = _triton_kernels()
    inv = k.inverse_fwd(idx.contiguous(), num_tokens)
    return k.scatter_tokens_fwd(x.contiguous(), inv, _fill_vector(fill, x.dtype))


@scatter_tokens_triton.register_fake
def _(x, idx, num_tokens, fill):
    return x.new_empty(x.shape[0], num_tokens, x.shape[2])


@torch.library.custom_op("microdit::triton_dropped_sum", mutates_args=())
def dropped_sum_triton(src: torch.Tensor, idx: torch.Tensor, num_tokens: int, grid_w: int, patch: int) -> torch.Tensor:
    """(F,) float32 (float64 for float64 `src`): the sum over all samples' dropped tokens of
    (B, T, F) rows, or of the patches of a (B, C, H, W) image (tokens on a grid `grid_w` wide)."""
    k = _triton_kernels()
    return k.dropped_sum_fwd(src.contiguous(), k.inverse_fwd(idx.contiguous(), num_tokens), grid_w, patch)


@dropped_sum_triton.register_fake
def _(src, idx, num_tokens, grid_w, patch):
    F = src.shape[2] if src.dim() == 3 else patch * patch * src.shape[1]
    return src.new_empty(F, dtype=torch.float64 if src.dtype == torch.float64 else torch.float32)


@torch.library.custom_op("microdit::triton_unmask_unpatchify", mutates_args=())
def unmask_unpatchify_triton(x: torch.Tensor, idx: torch.Tensor, num_tokens: int, fill: torch.Tensor | None,
                             grid_h: int, grid_w: int, patch: int, channels: int) -> torch.Tensor:
    """(B, K, p*p*C) -> (B, C, grid_h*p, grid_w*p) in one pass over the output."""
    k = _triton_kernels()
    inv = k.inverse_fwd(idx.contiguous(), num_tokens)
    return k.unmask_unpatchify_fwd(x.contiguous(), inv, _fill_vector(fill, x.dtype), grid_h, grid_w, patch, channels)


@unmask_unpatchify_triton.register_fake
def _(x, idx, num_tokens, fill, grid_h, grid_w, patch, channels):
    return x.new_empty(x.shape[0], channels, grid_h * patch, grid_w * patch)


@torch.library.custom_op("microdit::triton_gather_image", mutates_args=())
def gather_image_triton(img: torch.Tensor, idx: torch.Tensor, grid_w: int, patch: int) -> torch.Tensor:
    """(B, C, H, W), (B, K) -> (B, K, p*p*C): the patches of the kept tokens."""
    return _triton_kernels().gather_image_fwd(img.contiguous(), idx.contiguous(), grid_w, patch)


@gather_image_triton.register_fake
def _(img, idx, grid_w, patch):
    return img.new_empty(img.shape[0], idx.shape[1], patch * patch * img.shape[1])


def _setup_gather(ctx, inputs, output):
    src, idx, *rest = inputs  # (x, idx) or (img, idx, grid_w, patch)
    ctx.save_for_backward(idx)
    ctx.src_shape, ctx.rest = src.shape, rest


def _setup_scatter(ctx, inputs, output):
    x, idx, num_tokens, fill, *grid = inputs  # grid: (grid_h, grid_w, patch, channels) if fused
    ctx.save_for_backward(idx)
    ctx.num_tokens, ctx.grid = num_tokens, grid
    ctx.fill_meta = None if fill is None else (fill.shape, fill.dtype)


def _fill_grad(ctx, grad, idx, grid_w=1, patch=1):
    """mask_token's gradient: the sum of the output gradient over dropped tokens."""
    if ctx.fill_meta is None or not ctx.needs_input_grad[3]:
        return None
    shape, dtype = ctx.fill_meta
    return dropped_sum_triton(grad, idx, ctx.num_tokens, grid_w, patch).reshape(shape).to(dtype)


def _gather_tokens_triton_bwd(ctx, grad):
    (idx,) = ctx.saved_tensors
    return scatter_tokens_triton(grad, idx, ctx.src_shape[1], None), None


def _scatter_tokens_triton_bwd(ctx, grad):
    (idx,) = ctx.saved_tensors
    return gather_tokens_triton(grad, idx), None, None, _fill_grad(ctx, grad, idx)


def _unmask_unpatchify_triton_bwd(ctx, grad):
    (idx,) = ctx.saved_tensors
    _, grid_w, patch, _ = ctx.grid
    dx = gather_image_triton(grad, idx, grid_w, patch)
    return dx, None, None, _fill_grad(ctx, grad, idx, grid_w, patch), None, None, None, None


def _gather_image_triton_bwd(ctx, grad):
    (idx,) = ctx.saved_tensors
    grid_w, patch = ctx.rest
    _, channels, H, _ = ctx.src_shape
    grid_h = H // patch
    img = unmask_unpatchify_triton(grad, idx, grid_h * grid_w, None, grid_h, grid_w, patch, channels)
    return img, None, None, None


gather_tokens_triton.register_autograd(_gather_tokens_triton_bwd, setup_context=_setup_gather)
scatter_tokens_triton.register_autograd(_scatter_tokens_triton_bwd, setup_context=_setup_scatter)
unmask_unpatchify_triton.register_autograd(_unmask_unpatchify_triton_bwd, setup_context=_setup_scatter)
gather_image_triton.register_autograd(_gather_image_triton_bwd, setup_context=_setup_gather)


@torch.library.custom_op("microdit::triton_keep_indices", mutates_args=())
def keep_indices_triton_op(noise: torch.Tensor, k: int) -> torch.Tensor:
    """(B, T) noise -> (B, k) int64: each row's k smallest entries' indices, in order."""
    return _triton_kernels().keep_indices_fwd(noise.contiguous(), k)


@keep_indices_triton_op.register_fake
def _(noise, k):
    return noise.new_empty(noise.shape[0], k, dtype=torch.int64)


def _triton_token_supports(x, *args, **kwargs):
    reasons = []
    if x.device.type == "cpu" and x.dtype != torch.float32:
        reasons.append(f"dtype {x.dtype} on the CPU (the Triton interpreter runs float32 only)")
    elif x.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        reasons.append(f"dtype {x.dtype} not supported (supported: fp32, fp16, bf16, fp64)")
    return reasons + triton_device_reasons(x.device.type)


def _triton_keep_supports(batch, num_tokens, mask_ratio, device=None, generator=None):
    return triton_device_reasons(torch.device(device or "cpu").type)


@keep_indices_op.register("triton", 25, triton_available_reasons, _triton_keep_supports)
def keep_indices_triton(batch, num_tokens, mask_ratio, device=None, generator=None):
    """The reference's indices from the same noise: each token's rank counted on the device
    (no argsort), the K lowest kept in order."""
    noise = torch.rand(batch, num_tokens, device=device, generator=generator)
    return keep_indices_triton_op(noise, num_kept(num_tokens, mask_ratio))


mask_tokens_op.register("triton", 25, triton_available_reasons, _triton_token_supports)(
    lambda x, ids_keep: gather_tokens_triton(x, ids_keep))
unmask_tokens_op.register("triton", 25, triton_available_reasons, _triton_token_supports)(
    lambda x, ids_keep, num_tokens, mask_token: scatter_tokens_triton(x, ids_keep, num_tokens, mask_token))
unmask_unpatchify_op.register("triton", 25, triton_available_reasons, _triton_token_supports)(
    lambda x, ids_keep, num_tokens, mask_token, gh, gw, p, c:
    unmask_unpatchify_triton(x, ids_keep, num_tokens, mask_token, gh, gw, p, c))
