"""Exponential moving average of model weights, kept in float32 and laid out like the parameters.

Under FSDP2 each rank keeps the EMA of its own parameter shards only (a DTensor shard beside
each parameter shard), so the update is local, one `_foreach_lerp_` over the rank's shards, with
no all-gather and no full fp32 copy of the model per rank. The whole EMA is gathered only when it
is saved in full or used for sampling.
"""
from __future__ import annotations

import torch


def _is_dtensor(t) -> bool:
    return hasattr(t, "to_local") and hasattr(t, "placements")


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of an FSDP2 shard (the storage itself, not a copy), else the tensor."""
    return t.to_local() if _is_dtensor(t) else t


def _full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of an FSDP2 shard (a collective: every rank calls it), else the tensor."""
    return t.full_tensor() if _is_dtensor(t) else t


class EMA:
    """`shadow = decay * shadow + (1 - decay) * param`, from `start_step` on (a copy before that).

    Build it from the model as it trains (after FSDP2 wrapping) so that the shadow is sharded too.
    """

    def __init__(self, model: torch.nn.Module, decay: float, start_step: int = 0):
        self.decay, self.start_step = decay, start_step
        self.shadow = {k: v.detach().float().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> None:
        decay = self.decay if step >= self.start_step else 0.0
        shadows, params = [], []
        for k, v in model.state_dict().items():
            s, p = _local(self.shadow[k]), _local(v.detach())
            if p.dtype.is_floating_point:
                shadows.append(s)
                params.append(p if p.dtype == torch.float32 else p.float())
            else:
                s.copy_(p)
        if shadows:  # one fused kernel launch over all tensors, not one per tensor
            torch._foreach_lerp_(shadows, params, 1.0 - decay)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The whole EMA weights (a collective under FSDP2: every rank calls it)."""
        return {k: _full(v) for k, v in self.shadow.items()}

    def state_dict(self) -> dict:
        """decay, start_step and the whole shadow (gathered under FSDP2: a collective)."""
        return {"decay": self.decay, "start_step": self.start_step, "shadow": self.full_state_dict()}

    def sharded_state_dict(self) -> dict:
        """As state_dict, but each rank's shadow shards as they are (for torch.distributed.checkpoint)."""
        return {"decay": self.decay, "start_step": self.start_step, "shadow": self.shadow}

    @torch.no_grad()
    def load_state_dict(self, sd: dict) -> None:
        """From a full or a sharded state dict; under FSDP2 each rank keeps its own shard of a full one."""
        from torch.distributed.tensor import distribute_tensor

        missing = set(self.shadow) - set(sd["shadow"])
        if missing:
            raise ValueError(f"EMA state lacks tensors: {sorted(missing)[:3]}")
        self.decay, self.start_step = sd["decay"], sd["start_step"]
        for k, dst in self.shadow.items():
            src = sd["shadow"][k]
            if src is dst:
                continue  # loaded in place (torch.distributed.checkpoint)
            if _is_dtensor(dst) and not _is_dtensor(src):
                # Every rank holds the whole tensor: take this rank's shard, no communication.
                src = distribute_tensor(src.to(dst.device, torch.float32), dst.device_mesh, dst.placements,
                                        src_data_rank=None)
            _local(dst).copy_(_local(src))
