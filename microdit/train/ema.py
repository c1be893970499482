"""Exponential moving average of model weights, kept in float32."""
from __future__ import annotations

import torch


class EMA:
    """`shadow = decay * shadow + (1 - decay) * param`, from `start_step` on (a copy before that)."""

    def __init__(self, model: torch.nn.Module, decay: float, start_step: int = 0):
        self.decay, self.start_step = decay, start_step
        self.shadow = {k: _full(v).detach().float().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> None:
        decay = self.decay if step >= self.start_step else 0.0
        for k, v in model.state_dict().items():
            v = _full(v)
            s = self.shadow[k]
            if v.dtype.is_floating_point:
                s.lerp_(v.detach().float(), 1.0 - decay)
            else:
                s.copy_(v)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "start_step": self.start_step, "shadow": self.shadow}

    def load_state_dict(self, sd: dict) -> None:
        missing = set(self.shadow) - set(sd["shadow"])
        if missing:
            raise ValueError(f"EMA state lacks tensors: {sorted(missing)[:3]}")
        self.decay, self.start_step = sd["decay"], sd["start_step"]
        for k in self.shadow:
            self.shadow[k].copy_(sd["shadow"][k])


def _full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of an FSDP2 shard (a collective: every rank calls it), else the tensor."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t
