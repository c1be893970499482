"""Named MicroDiT configurations: the two published presets and small ones for CPU work."""
from __future__ import annotations

from .config import MicroDiTConfig, linspace

# Each preset: constructor arguments, plus the (lo, hi) ranges of layer-wise scaling, turned
# into per-block lists for whatever depth the model ends up with.
PRESETS: dict[str, dict] = {
    "MicroDiT_XL_2": dict(
        dim=1024, depth=28, head_dim=64, patch_mixer_depth=6, patch_mixer_dim=768,
        qkv_range=(0.5, 1.0), ffn_range=(0.5, 4.0), num_experts=8, expert_capacity=2.0,
    ),
    "MicroDiT_Tiny_2": dict(
        dim=512, depth=16, head_dim=32, patch_mixer_depth=4, patch_mixer_dim=512,
        qkv_range=(0.5, 1.0), ffn_range=(0.5, 4.0), num_experts=8, expert_capacity=2.0,
    ),
    # MicroDiT_XL_2's structure (mixer narrower than the backbone at 3/4 width, head_dim 64,
    # multiple_of 256, 1024-wide captions, 8 experts every other block, the same layer-wise
    # scaling) at a size a CPU steps in seconds: what `microdit bench` measures XL's mix on here.
    "MicroDiT_XL_Tiny_2": dict(
        dim=512, depth=8, head_dim=64, patch_mixer_depth=2, patch_mixer_dim=384,
        qkv_range=(0.5, 1.0), ffn_range=(0.5, 4.0), num_experts=8, expert_capacity=2.0,
    ),
    # About 2.5M parameters: trains on a 2-core CPU in minutes (the demo, `configs/demo.yaml`).
    "MicroDiT_Micro_2": dict(
        dim=128, depth=4, head_dim=32, multiple_of=32, caption_channels=384, input_size=16,
        patch_mixer_depth=2, patch_mixer_dim=96, qkv_range=(0.5, 1.0), ffn_range=(0.5, 4.0),
        num_experts=4, expert_capacity=2.0,
    ),
    # The smallest model with every feature switched on, for tests.
    "MicroDiT_Test_2": dict(
        dim=64, depth=4, head_dim=16, multiple_of=32, caption_channels=32, input_size=8,
        patch_mixer_depth=2, patch_mixer_dim=48, qkv_range=(0.5, 1.0), ffn_range=(0.5, 4.0),
        num_experts=4, expert_capacity=2.0,
    ),
}


def preset_config(name: str, **overrides) -> MicroDiTConfig:
    """The config of preset `name` with `overrides` applied (any MicroDiTConfig field)."""
    if name not in PRESETS:
        raise KeyError(f"unknown MicroDiT preset {name!r}; known: {', '.join(PRESETS)}")
    kw = dict(PRESETS[name])
    qkv_lo_hi, ffn_lo_hi = kw.pop("qkv_range"), kw.pop("ffn_range")
    kw.update(overrides)
    depth = kw.get("depth", MicroDiTConfig.depth)
    kw.setdefault("qkv_multipliers", linspace(*qkv_lo_hi, depth))
    kw.setdefault("ffn_multipliers", linspace(*ffn_lo_hi, depth))
    return MicroDiTConfig.from_dict(kw)
