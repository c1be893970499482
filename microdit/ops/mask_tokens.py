"""mask_tokens: (B, T, D), (B, K) -> (B, K, D), the kept tokens in the order of `ids_keep`.

reference: the published code's `torch.gather` with the index expanded over the feature dim;
torch: row indexing; cpp / cuda: microdit._C row copies (csrc/mask_tokens/); triton:
kernels/mask_tokens.py. The custom ops behind the compiled backends are in ops/token_rows.py.
"""
from __future__ import annotations

import torch

from .. import _ext
from ..availability import triton_available_reasons
from .registry import Op
from .token_rows import EXTENSION_BACKENDS, mask_tokens_ext, mask_tokens_triton, triton_token_supports

mask_tokens_op = Op("mask_tokens", "(B, T, D) -> (B, K, D): select kept tokens")


@mask_tokens_op.register("reference", priority=0)
def mask_tokens_reference(x, ids_keep):
    """Published: gather with the index expanded over the feature dim."""
    return torch.gather(x, dim=1, index=ids_keep.unsqueeze(-1).repeat(1, 1, x.shape[-1]))


@mask_tokens_op.register("torch", priority=10)
def mask_tokens_torch(x, ids_keep):
    """Row gather by advanced indexing: no (B, K, D) index tensor is materialised."""
    rows = torch.arange(x.shape[0], device=x.device).unsqueeze(1)
    return x[rows, ids_keep]


for _name, _prio, _avail, _dev in EXTENSION_BACKENDS:
    mask_tokens_op.register(_name, _prio, _avail, _ext.supports(_dev))(mask_tokens_ext)
mask_tokens_op.register("triton", 25, triton_available_reasons, triton_token_supports)(mask_tokens_triton)


def mask_tokens(x: torch.Tensor, ids_keep: torch.Tensor, backend=None) -> torch.Tensor:
    """(B, T, D), (B, K) -> (B, K, D): the kept tokens, in the order of `ids_keep`."""
    return mask_tokens_op(x, ids_keep, backend=backend)
