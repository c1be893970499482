"""Analytic model FLOPs of MicroDiT per image (matmuls, convolutions and attention; 2 per MAC).

`training` counts forward plus backward as autograd runs them: every matmul's backward costs
twice its forward, except that the three input layers (patch embedding, first timestep and
first caption linear) compute no gradient for their inputs. MoE layers count the useful work
only (router, and each expert's FFN over the k tokens it chose); the published one-hot
dispatch/combine costs more and is reported separately as `moe_onehot_overhead`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..nn.layers import attention_width, moe_hidden, swiglu_hidden
from ..ops.moe import expert_capacity
from ..ops.keep_indices import num_kept
from .config import MicroDiTConfig


@dataclass
class FlopCount:
    """FLOPs per image by part; `forward`, `training` totals."""

    parts: dict[str, float] = field(default_factory=dict)
    input_layers: float = 0.0  # forward FLOPs of layers whose input needs no gradient
    moe_onehot_overhead: float = 0.0  # extra forward FLOPs of the published one-hot dispatch

    def add(self, part: str, flops: float):
        self.parts[part] = self.parts.get(part, 0.0) + flops

    @property
    def forward(self) -> float:
        return sum(self.parts.values())

    @property
    def training(self) -> float:
        return 3 * self.forward - self.input_layers


def _block(fc: FlopCount, cfg: MicroDiTConfig, d, n, h, ffn_ratio, moe, L, prefix):
    D = cfg.dim
    fc.add(f"{prefix}/modulation", 2 * D * 6 * d)
    fc.add(f"{prefix}/attention_linear", 2 * n * d * 3 * h + 2 * n * h * d)
    fc.add(f"{prefix}/attention_core", 4 * n * n * h)
    fc.add(f"{prefix}/cross_attention_linear", 2 * n * d * d + 2 * L * d * 2 * d + 2 * n * d * d)
    fc.add(f"{prefix}/cross_attention_core", 4 * n * L * d)
    if moe:
        E = cfg.num_experts
        k = expert_capacity(n, E, cfg.expert_capacity)
        hid = moe_hidden(d, ffn_ratio, cfg.multiple_of)
        fc.add(f"{prefix}/moe_router", 2 * n * d * E)
        fc.add(f"{prefix}/moe_experts", 2 * 2 * E * k * d * hid)
        fc.moe_onehot_overhead += 2 * 2 * E * k * n * d
    else:
        fc.add(f"{prefix}/ffn", 3 * 2 * n * d * swiglu_hidden(d, ffn_ratio, cfg.multiple_of))


def model_flops(cfg: MicroDiTConfig, mask_ratio: float = 0.0, caption_len: int = 77,
                grid: int | None = None) -> FlopCount:
    """FLOPs per image for `cfg` at `mask_ratio`, `caption_len` caption tokens, latent grid `grid` tokens/side."""
    g = grid or cfg.grid_size
    T, L, D, p, C, Cy = g * g, caption_len, cfg.dim, cfg.patch_size, cfg.in_channels, cfg.caption_channels
    K = num_kept(T, mask_ratio) if mask_ratio > 0 else T
    fc = FlopCount()
    embed = 2 * T * D * C * p * p
    t_first, y_first = 2 * 512 * D, 2 * L * Cy * D
    fc.add("embed/patch", embed)
    fc.add("embed/timestep", t_first + 2 * D * D)
    fc.add("embed/caption", y_first + 2 * L * D * D)
    fc.input_layers = embed + t_first + y_first
    hc = swiglu_hidden(D, 4.0, cfg.multiple_of)
    fc.add("caption_block", 2 * L * D * 3 * D + 4 * L * L * D + 2 * L * D * D + 3 * 2 * L * D * hc)
    fc.add("embed/pooled", 2 * 2 * D * D)
    if cfg.use_patch_mixer:
        Dm = cfg.patch_mixer_dim
        if Dm != D:
            fc.add("mixer/maps", 2 * T * D * Dm + 2 * L * D * Dm + 2 * K * Dm * D)
        for i in range(cfg.patch_mixer_depth):
            _block(fc, cfg, Dm, T, attention_width(Dm, cfg.patch_mixer_qkv_ratio, cfg.head_dim),
                   cfg.patch_mixer_mlp_ratio, cfg.is_moe_block(i, cfg.patch_mixer_depth, False), L, "mixer")
    for i in range(cfg.depth):
        _block(fc, cfg, D, K, attention_width(D, cfg.qkv_multipliers[i], cfg.head_dim),
               cfg.ffn_multipliers[i], cfg.is_moe_block(i, cfg.depth, True), L, "backbone")
    fc.add("final", 2 * D * 2 * D + 2 * K * D * cfg.patch_dim)
    return fc
