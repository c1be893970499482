"""keep_indices: a per-sample random subset of kept token indices, in random order.

The reference backend computes what the published MicroDiT code computes, the same way:
uniform noise + full argsort, the first K kept. Other backends give the same indices from the
same noise: torch (partial top-k) and triton (kernels/keep_indices.py: ranks counted on the
device, no sort). `drop_mask` and `check_ids_keep` describe and validate such indices for the
token ops that take them (mask_tokens, unmask_tokens, unmask_unpatchify).
"""
from __future__ import annotations

import torch

from ..availability import triton_available_reasons, triton_device_reasons
from .registry import Op

keep_indices_op = Op("keep_indices", "per-sample random subset of kept token indices, in random order")


def num_kept(num_tokens: int, mask_ratio: float) -> int:
    """Kept tokens per sample, as the published code counts them."""
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
    return int(num_tokens * (1 - mask_ratio))


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


# ---------------------------------------------------------------- Triton (kernels/keep_indices.py)
@torch.library.custom_op("microdit::triton_keep_indices", mutates_args=())
def keep_indices_triton_op(noise: torch.Tensor, k: int) -> torch.Tensor:
    """(B, T) noise -> (B, k) int64: each row's k smallest entries' indices, in order."""
    from microdit.kernels import keep_indices as kernels  # imports triton: only when used

    return kernels.keep_indices_fwd(noise.contiguous(), k)


@keep_indices_triton_op.register_fake
def _(noise, k):
    return noise.new_empty(noise.shape[0], k, dtype=torch.int64)


def _triton_keep_supports(batch, num_tokens, mask_ratio, device=None, generator=None):
    return triton_device_reasons(torch.device(device or "cpu").type)


@keep_indices_op.register("triton", 25, triton_available_reasons, _triton_keep_supports)
def keep_indices_triton(batch, num_tokens, mask_ratio, device=None, generator=None):
    """The reference's indices from the same noise: each token's rank counted on the device
    (no argsort), the K lowest kept in order."""
    noise = torch.rand(batch, num_tokens, device=device, generator=generator)
    return keep_indices_triton_op(noise, num_kept(num_tokens, mask_ratio))
