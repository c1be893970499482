"""unmask_tokens: (B, K, P) -> (B, T, P), kept tokens back in place, `mask_token` elsewhere.

reference: the published code's concatenate-with-mask-tokens-then-gather-by-`ids_restore`;
torch: fill and scatter the kept rows; cpp / cuda: microdit._C (csrc/unmask_tokens/); triton:
kernels/unmask_tokens.py through an inverse map. The custom ops are in ops/token_rows.py.
"""
from __future__ import annotations

import torch

from .. import _ext
from ..availability import triton_available_reasons
from .keep_indices import drop_mask
from .registry import Op
from .token_rows import EXTENSION_BACKENDS, triton_token_supports, unmask_tokens_ext, unmask_tokens_triton

unmask_tokens_op = Op("unmask_tokens", "(B, K, P) -> (B, T, P): put kept tokens back, fill mask_token")


def _ids_restore(ids_keep: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """The published code's `ids_restore` for a shuffle that starts with `ids_keep`.

    Which order the dropped tokens take in the shuffle does not change the result (they all
    become `mask_token`), so they are appended in increasing index order.
    """
    kept = 1 - drop_mask(ids_keep, num_tokens)  # (B, T): 1 where kept
    # Dropped tokens first, each group in increasing index order (a stable sort); no boolean
    # indexing, whose data-dependent shape is a graph break under torch.compile.
    rest = torch.argsort(kept, dim=1, stable=True)[:, : num_tokens - ids_keep.shape[1]]
    ids_shuffle = torch.cat([ids_keep, rest], dim=1)
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


for _name, _prio, _avail, _dev in EXTENSION_BACKENDS:
    unmask_tokens_op.register(_name, _prio, _avail, _ext.supports(_dev))(unmask_tokens_ext)
unmask_tokens_op.register("triton", 25, triton_available_reasons, triton_token_supports)(unmask_tokens_triton)


def unmask_tokens(x, ids_keep, num_tokens: int, mask_token, backend=None) -> torch.Tensor:
    """(B, K, P) -> (B, T, P): kept tokens back in place, `mask_token` (1, 1, P) elsewhere."""
    return unmask_tokens_op(x, ids_keep, num_tokens, mask_token, backend=backend)
