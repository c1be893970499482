"""AdamW with a separate parameter group for expert weights, and the learning-rate schedule."""
from __future__ import annotations

import math

import torch

from ..models.state_dict import strip_prefixes
from ..nn.layers import ExpertChoiceMoE


def expert_parameter_names(model: torch.nn.Module) -> set[str]:
    """Names of the expert weights (W1, W2 of every expert-choice MoE layer; not the router)."""
    names = set()
    for mod_name, mod in model.named_modules():
        if isinstance(mod, ExpertChoiceMoE):
            prefix = f"{mod_name}." if mod_name else ""
            names.update({prefix + "w1", prefix + "w2"})
    return names


def build_optimizer(model: torch.nn.Module, cfg) -> torch.optim.AdamW:
    """AdamW (the paper's settings); expert weights get lr * moe_lr_factor. `cfg` is an OptimSection."""
    experts = expert_parameter_names(_unwrap(model))
    dense, expert = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (expert if strip_prefixes(name) in experts else dense).append(p)
    groups = [{"params": dense, "lr_factor": 1.0, "name": "dense"}]
    if expert:
        groups.append({"params": expert, "lr_factor": cfg.moe_lr_factor, "name": "experts"})
    for g in groups:
        g["lr"] = cfg.lr * g["lr_factor"]
    fused = use_fused(model, getattr(cfg, "fused", None))
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps,
                             weight_decay=cfg.weight_decay, **({"fused": True} if fused else {"foreach": True}))


def use_fused(model: torch.nn.Module, choice: bool | None) -> bool:
    """Whether AdamW runs its fused kernel: `choice`, or (None) where the parameters are on CUDA.
    An explicit True on a device without the kernel is an error naming the device."""
    devices = {p.device.type for p in model.parameters()}
    if choice is None:
        return devices == {"cuda"}
    if choice and not all(fused_supported(d) for d in devices):
        raise ValueError(f"optim.fused=true: AdamW has no fused kernel for {sorted(devices)} parameters")
    return bool(choice)


def fused_supported(device_type: str) -> bool:
    """Whether torch has AdamW's fused kernel for parameters on `device_type` (the CPU has one too)."""
    from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

    return device_type in _get_fused_kernels_supported_devices()


def lr_at(step: int, total_steps: int, cfg) -> float:
    """Linear warm-up to `lr`, then cosine down to `min_lr_ratio * lr` at `total_steps`, or constant."""
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    span = max(1, total_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    floor = cfg.min_lr_ratio * cfg.lr
    return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = lr * g.get("lr_factor", 1.0)


def _unwrap(model):
    return getattr(model, "module", model)

