"""Token masking: random keep indices, select kept tokens, and un-mask with `mask_token`.

The reference backend computes what the published MicroDiT code computes, the same way:
uniform noise + full argsort for the keep indices, `torch.gather` with an expanded index to
mask, and concatenate-with-mask-tokens-then-gather-by-`ids_restore` to un-mask.
"""
from __future__ import annotations

import torch

from .. import _ext
from ..availability import extension_cuda_reasons, extension_reasons
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


def _ext_supports(device_type):
    def supports(x, *args, **kwargs):
        reasons = []
        if x.device.type != device_type:
            reasons.append(f"tensor on {x.device.type}, this backend runs on {device_type}")
        if x.dtype not in _ext.DTYPE_CODES:
            reasons.append(f"dtype {x.dtype} not supported (supported: fp32, fp16, bf16, fp64)")
        return reasons
    return supports


for _name, _prio, _avail, _dev in (("cuda", 30, extension_cuda_reasons, "cuda"), ("cpp", 20, extension_reasons, "cpu")):
    mask_tokens_op.register(_name, _prio, _avail, _ext_supports(_dev))(
        lambda x, ids_keep: gather_tokens_ext(x, ids_keep))
    unmask_tokens_op.register(_name, _prio, _avail, _ext_supports(_dev))(
        lambda x, ids_keep, num_tokens, mask_token: scatter_tokens_ext(x, ids_keep, num_tokens, mask_token))
