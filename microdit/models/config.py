"""MicroDiT configuration. Field names are the published constructor's keyword arguments."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np


def linspace(lo: float, hi: float, n: int) -> list[float]:
    """Per-block ratios for layer-wise scaling (float64, as numpy computes them)."""
    return [float(v) for v in np.linspace(lo, hi, n)]


@dataclass
class MicroDiTConfig:
    """Architecture of a MicroDiT. `qkv_multipliers`/`ffn_multipliers` hold one ratio per backbone block."""

    input_size: int = 32  # latent grid side the position table is built for (H/W of the latents)
    patch_size: int = 2
    in_channels: int = 4
    dim: int = 1024
    depth: int = 28
    head_dim: int = 64
    multiple_of: int = 256
    caption_channels: int = 1024
    pos_interp_scale: float = 1.0
    norm_eps: float = 1e-6
    depth_init: bool = True  # scale output-projection init by block depth (spec 4b)
    # The standard deviation of the published 0.02 inits (spec 4b), tuned for width 1024. Not a
    # tensor of the model: only training from scratch reads it. Narrow models learn much faster
    # with a larger one (docs/demo_experiments.md, fifth round).
    init_std: float = 0.02
    # The final layer's norm before its adaLN modulation and linear map: "layernorm" (published)
    # or "none" (its learnable weight only, no per-token centring or division; the demo's, from
    # docs/demo_experiments.md, sixth and seventh rounds: twice the ShapesEval score of a narrow
    # model on pixel latents with exactly-zero backgrounds).
    final_norm: str = "layernorm"
    # The same choice for the LayerNorms of the maps into and out of the patch mixer (between the
    # patch embedding and the backbone, on every token's path to the output): "layernorm"
    # (published) or "none" (docs/demo_experiments.md, seventh round).
    mixer_map_norm: str = "layernorm"
    qkv_multipliers: list[float] = field(default_factory=lambda: [1.0])
    ffn_multipliers: list[float] = field(default_factory=lambda: [4.0])
    use_patch_mixer: bool = True
    patch_mixer_depth: int = 6
    patch_mixer_dim: int = 768
    patch_mixer_qkv_ratio: float = 1.0
    patch_mixer_mlp_ratio: float = 4.0
    use_bias: bool = False
    num_experts: int = 8
    expert_capacity: float = 2.0
    experts_every_n: int = 2
    # Not part of the published model: per-op backend choice ({"moe": "torch", ...}).
    backends: dict[str, str] = field(default_factory=dict)

    def __post_init__(self):
        if self.final_norm not in ("layernorm", "none"):
            raise ValueError(f"final_norm must be 'layernorm' or 'none', got {self.final_norm!r}")
        if self.mixer_map_norm not in ("layernorm", "none"):
            raise ValueError(f"mixer_map_norm must be 'layernorm' or 'none', got {self.mixer_map_norm!r}")
        for name in ("qkv_multipliers", "ffn_multipliers"):
            v = [float(r) for r in getattr(self, name)]
            if len(v) == 1:
                v = v * self.depth
            if len(v) != self.depth:
                raise ValueError(f"{name} has {len(v)} entries; expected 1 or depth={self.depth}")
            setattr(self, name, v)
        if self.input_size % self.patch_size:
            raise ValueError(f"input_size {self.input_size} is not a multiple of patch_size {self.patch_size}")
        if self.dim % self.head_dim:
            raise ValueError(f"dim {self.dim} is not a multiple of head_dim {self.head_dim}")
        if self.use_patch_mixer and self.patch_mixer_dim % self.head_dim:
            raise ValueError(f"patch_mixer_dim {self.patch_mixer_dim} is not a multiple of head_dim {self.head_dim}")

    @property
    def grid_size(self) -> int:
        return self.input_size // self.patch_size

    @property
    def num_tokens(self) -> int:
        return self.grid_size**2

    @property
    def patch_dim(self) -> int:
        return self.patch_size**2 * self.in_channels

    def is_moe_block(self, i: int, depth: int, is_backbone: bool) -> bool:
        """Blocks i with (i+1) % experts_every_n == 0 are MoE; never the backbone's last block."""
        if self.num_experts <= 0 or self.experts_every_n <= 0:
            return False
        if is_backbone and i == depth - 1:
            return False
        return (i + 1) % self.experts_every_n == 0

    @classmethod
    def fields(cls) -> set[str]:
        return {f.name for f in dataclasses.fields(cls)}

    @classmethod
    def from_dict(cls, d: dict) -> "MicroDiTConfig":
        unknown = set(d) - cls.fields()
        if unknown:
            raise ValueError(f"unknown MicroDiT config keys: {sorted(unknown)}")
        return cls(**d)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def replace(self, **overrides) -> "MicroDiTConfig":
        return dataclasses.replace(self, **overrides)
