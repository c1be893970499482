"""Loading and saving checkpoints in the published MicroDiT format.

A published checkpoint is a state dict whose keys are the names in the spec's tensor list. It
may carry a `dit.` prefix on every key, or sit inside a training-framework checkpoint as
`state["model"]`; VAE or text-encoder keys beside it are ignored.
"""
from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from pathlib import Path

import torch

from ..files import atomic_path
from ..ops.opset import probe_ops
from .config import MicroDiTConfig
from .state_dict import WRAPPER_PREFIXES, shape_mismatches, strip_prefixes
from .microdit import MicroDiT, sincos_pos_table
from .presets import PRESETS, preset_config

_TOP = ("pos_embed", "mask_token", "x_embedder", "t_embedder", "y_embedder", "y_emb_preprocess",
        "pooled_y_emb_process", "patch_mixer", "patch_mixer_map_xin", "patch_mixer_map_xout",
        "patch_mixer_map_y", "blocks", "final_layer")


class CheckpointError(ValueError):
    """A checkpoint that is not a MicroDiT of the expected shape; the message names the tensor."""


def _is_dit_key(key: str) -> bool:
    return key.split(".", 1)[0] in _TOP


def read(path) -> Mapping:
    """The raw contents of a published-format file (.safetensors, or a torch pickle read weights-only)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"cannot read {path} as safetensors: {e}") from e
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        raise CheckpointError(f"cannot read {path} as a torch checkpoint: {type(e).__name__}: {e}") from e


def extract_state_dict(obj, name: str = "checkpoint") -> dict[str, torch.Tensor]:
    """The DiT tensors of a published-format object, keys without any `dit.` prefix."""
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{name}: expected a state dict, got {type(obj).__name__}")
    for nested in ("model", "state_dict", "ema"):
        inner = obj.get(nested)
        if isinstance(inner, Mapping) and not any(_is_dit_key(k) for k in obj):
            return extract_state_dict(inner, f"{name}[{nested!r}]")
    if isinstance(obj.get("state"), Mapping) and isinstance(obj["state"].get("model"), Mapping):
        return extract_state_dict(obj["state"]["model"], f"{name}['state']['model']")
    out = {}
    for key, value in obj.items():
        if not isinstance(key, str):
            continue
        k = strip_prefixes(key, (*WRAPPER_PREFIXES, "dit.", "model.dit."))
        k = k if _is_dit_key(k) else key
        if _is_dit_key(k):
            if not isinstance(value, torch.Tensor):
                raise CheckpointError(f"{name}: {key} is a {type(value).__name__}, not a tensor")
            out[k] = value
    if not out:
        sample = ", ".join(list(map(str, obj))[:5])
        raise CheckpointError(f"{name}: no MicroDiT tensors found (first keys: {sample})")
    return out


def _need(sd, key, ndim, name):
    if key not in sd:
        raise CheckpointError(f"{name}: missing tensor {key!r}")
    t = sd[key]
    if t.dim() != ndim:
        raise CheckpointError(f"{name}: tensor {key!r} has shape {tuple(t.shape)}, expected {ndim} dims")
    return t


def _count(sd, prefix) -> int:
    idx = {int(m.group(1)) for k in sd if (m := re.match(rf"{prefix}\.(\d+)\.", k))}
    return max(idx) + 1 if idx else 0


def infer_config(sd: Mapping[str, torch.Tensor], name: str = "checkpoint") -> MicroDiTConfig:
    """Match a preset by the tensors; C, the latent grid and `pos_embed` come from the tensors."""
    D, C, p, _ = _need(sd, "x_embedder.proj.weight", 4, name).shape
    T = _need(sd, "pos_embed", 3, name).shape[1]
    Cy = _need(sd, "y_embedder.y_proj.fc1.weight", 2, name).shape[1]
    depth, mixer_depth = _count(sd, "blocks"), _count(sd, "patch_mixer")
    mixer_dim = sd["patch_mixer.0.norm1.weight"].shape[0] if mixer_depth else None
    grid = math.isqrt(T)
    if grid * grid != T:
        raise CheckpointError(f"{name}: pos_embed has {T} positions, not a square grid")
    near = []
    for preset, kw in PRESETS.items():
        if (kw["dim"], kw["depth"], kw["patch_mixer_depth"], kw["patch_mixer_dim"]) != (D, depth, mixer_depth, mixer_dim):
            continue
        cfg = preset_config(preset, in_channels=C, patch_size=p, input_size=grid * p, caption_channels=Cy)
        problem = _first_mismatch(sd, cfg)
        if problem is None:
            return cfg.replace(pos_interp_scale=_guess_interp_scale(sd["pos_embed"], cfg))
        near.append(f"{preset}: {problem}")
    raise CheckpointError(
        f"{name}: tensors match no preset (dim {D}, depth {depth}, mixer {mixer_depth}x{mixer_dim}"
        + (f"; closest {near[0]}" if near else "") + "); pass config= with the published constructor's arguments")


def _first_mismatch(sd: Mapping[str, torch.Tensor], cfg: MicroDiTConfig) -> str | None:
    """The first tensor a model of `cfg` lacks or shapes differently, or None when all fit."""
    with torch.device("meta"):  # shapes only: no backend is checked or warmed
        expected = MicroDiT(cfg, ops=probe_ops(cfg.backends)).state_dict()
    return _first_problem(expected, sd)


def _first_problem(expected, sd, *, what: str = "") -> str | None:
    """The first tensor of `expected` (in its order) that `sd` lacks or shapes differently, as text."""
    differ, missing, _ = shape_mismatches(expected, sd)
    bad = set(differ) | set(missing)
    key = next((k for k in expected if k in bad), None)
    if key is None:
        return None
    if key in missing:
        return f"missing tensor {key!r}" + (f" (expected shape {tuple(expected[key].shape)})" if what else "")
    return f"tensor {key!r} has shape {tuple(sd[key].shape)}, expected {tuple(expected[key].shape)}{what}"


def _guess_interp_scale(table: torch.Tensor, cfg: MicroDiTConfig) -> float:
    """The pos_interp_scale that regenerates the stored table (the stored table is used either way)."""
    for s in (1.0, 2.0, 4.0, cfg.grid_size / 16, 0.5):
        ref = torch.from_numpy(sincos_pos_table(cfg.dim, cfg.grid_size, cfg.grid_size, s)).float()
        if torch.allclose(table.float().reshape(ref.shape), ref, atol=1e-5):
            return s
    return cfg.pos_interp_scale


def load_reference(source, config: Mapping | MicroDiTConfig | None = None, *, strict: bool = True,
                   backends: Mapping[str, str] | None = None) -> MicroDiT:
    """A MicroDiT with the weights of a published-format checkpoint (path or state dict)."""
    name = str(source) if isinstance(source, (str, os.PathLike)) else "state dict"
    obj = read(source) if isinstance(source, (str, os.PathLike)) else source
    sd = extract_state_dict(obj, name)
    if config is None:
        cfg = infer_config(sd, name)
    elif isinstance(config, MicroDiTConfig):
        cfg = config
    else:
        cfg = MicroDiTConfig.from_dict(dict(config))
    if backends:
        cfg = cfg.replace(backends=dict(backends))
    with torch.device("meta"):
        model = MicroDiT(cfg)
    expected = model.state_dict()
    problem = _first_problem(expected, sd, what=" for this config")
    if problem:
        raise CheckpointError(f"{name}: {problem}")
    for key in expected:
        if not sd[key].dtype.is_floating_point:  # int, bool or complex weights are not a MicroDiT's
            raise CheckpointError(f"{name}: tensor {key!r} has dtype {sd[key].dtype}, expected a floating-point "
                                  "dtype (float32, float16 or bfloat16)")
    extra = sorted(set(sd) - set(expected))
    if extra and strict:
        raise CheckpointError(f"{name}: unexpected tensor {extra[0]!r} ({len(extra)} unexpected in all) "
                              f"for a model of depth {cfg.depth} and mixer depth {cfg.patch_mixer_depth}")
    # A caller's own dict is copied so the model never aliases it; a file's tensors are fresh.
    own = not isinstance(source, (str, os.PathLike))
    state = {k: _as_param(sd[k], own) for k in expected}
    model.load_state_dict(state, strict=True, assign=True)
    return model


def _as_param(t: torch.Tensor, copy: bool) -> torch.Tensor:
    t = t.detach().to(torch.float32).contiguous()
    return t.clone() if copy else t


def save_reference(model: MicroDiT, path, *, prefix: str = "") -> Path:
    """Write the model's weights in the published format (torch pickle, or .safetensors), atomically."""
    path = Path(path)
    sd = {prefix + k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        if path.suffix == ".safetensors":
            from safetensors.torch import save_file

            save_file(sd, str(tmp))
        else:
            torch.save(sd, tmp)
    return path
