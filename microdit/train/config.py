"""Training configuration: dataclasses with meaningful defaults; YAML files and key=value override them."""
from __future__ import annotations

import dataclasses
import importlib.resources
from dataclasses import dataclass, field
from pathlib import Path

import yaml


def _config_dir() -> Path:
    """The shipped YAML configs (repo `configs/`, installed as the package `microdit.configs`)."""
    return Path(str(importlib.resources.files("microdit.configs")))


@dataclass
class ModelSection:
    preset: str = "MicroDiT_Micro_2"
    overrides: dict = field(default_factory=dict)  # MicroDiTConfig fields
    backends: dict = field(default_factory=dict)  # per-op backend choice


@dataclass
class DataSection:
    path: str | None = None  # shards written by `microdit prepare`; None: prepare `source` into <out>/data
    source: str = "shapes"  # what to prepare when `path` is None
    num: int = 20000
    resolution: int = 32  # image pixels; the latent grid is resolution / codec downsample
    codec: str = "pixels"
    text_encoder: str = "minilm"
    caption_len: int = 77  # caption tokens (the text encoder pads or truncates to this)
    num_workers: int = 0
    caption_dropout: float = 0.1


@dataclass
class OptimSection:
    lr: float = 2.4e-4
    betas: tuple = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.1
    moe_lr_factor: float = 1.0  # learning-rate factor of expert weights (the paper intends 0.5)
    warmup_steps: int = 2500
    schedule: str = "cosine"  # "cosine" (to min_lr_ratio * lr at the last step) or "constant"
    min_lr_ratio: float = 0.33
    grad_clip: float = 0.25


@dataclass
class DiffusionSection:
    mask_ratio: float = 0.75
    P_mean: float = -0.6
    P_std: float = 1.2
    sigma_data: float = 0.9


@dataclass
class EMASection:
    enabled: bool = False
    decay: float = 0.9999
    start_step: int = 0


@dataclass
class FP8Section:
    """FP8 block GEMMs under train.precision=fp8 (see microdit.fp8)."""

    backend: str = "auto"  # auto | torch (torch._scaled_mm) | emulated | torchao | transformer_engine
    recipe: str = "tensorwise"  # tensorwise | rowwise | delayed


@dataclass
class TrainSection:
    steps: int = 1000
    global_batch: int = 64
    micro_batch: int = 64  # per rank; accumulation = global_batch / (micro_batch * world_size)
    seed: int = 0
    precision: str = "auto"  # "bf16" autocast, "fp32", "fp8" (block GEMMs, see fp8:), or "auto" (bf16 on GPU, fp32 on CPU)
    compile: bool = False
    parallel: str = "ddp"  # "ddp" or "fsdp" (FSDP2 fully_shard) when world_size > 1
    device: str = "auto"
    init_from: str | None = None  # a previous phase's checkpoint (file or training directory)
    log_every: int = 10
    ckpt_every: int = 500
    keep_checkpoints: int = 3
    sample_every: int = 0  # 0: only at the end
    sample_prompts: list = field(default_factory=lambda: [
        "a large red circle in the center",
        "a small blue square at the top left",
        "a large green triangle at the bottom right",
        "a small yellow circle on the left and a large purple square on the right",
    ])
    sample_steps: int = 30
    sample_guidance: float = 5.0
    max_bad_steps: int = 5  # stop after this many non-finite losses in a row
    tensorboard: bool = True


@dataclass
class TrainConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    diffusion: DiffusionSection = field(default_factory=DiffusionSection)
    ema: EMASection = field(default_factory=EMASection)
    fp8: FP8Section = field(default_factory=FP8Section)
    train: TrainSection = field(default_factory=TrainSection)
    out: str = "runs/demo"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _merge(obj, values: dict, where: str):
    """Set dataclass fields from a dict, recursing into sections; unknown keys are errors."""
    names = {f.name: f for f in dataclasses.fields(obj)}
    for key, value in values.items():
        if key not in names:
            raise ValueError(f"{where}: unknown key {key!r} (known: {', '.join(names)})")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ValueError(f"{where}.{key}: expected a mapping, got {value!r}")
            _merge(current, value, f"{where}.{key}")
        elif isinstance(current, dict) and isinstance(value, dict):
            setattr(obj, key, {**current, **value})  # dict settings merge key by key
        else:
            if isinstance(current, tuple) and isinstance(value, list):
                value = tuple(value)
            setattr(obj, key, value)


def _parse_value(text: str):
    return yaml.safe_load(text)


def resolve_config_path(name_or_path: str) -> Path:
    """A shipped config by name (`demo`, `phase1`, ...) or a YAML path."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml"):
        if not p.exists():
            raise FileNotFoundError(f"config file not found: {p}")
        return p
    shipped = _config_dir() / f"{name_or_path}.yaml"
    if not shipped.exists():
        names = sorted(q.stem for q in _config_dir().glob("*.yaml"))
        raise FileNotFoundError(f"no config {name_or_path!r}: not a .yaml path, nor one of {names}")
    return shipped


def load_config(name_or_path: str | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """Defaults, then the YAML file (which may `base:` another config), then `key.sub=value` overrides."""
    cfg = TrainConfig()
    if name_or_path:
        path = resolve_config_path(name_or_path)
        values = yaml.safe_load(path.read_text()) or {}
        chain = [values]
        while "base" in chain[-1]:
            chain.append(yaml.safe_load(resolve_config_path(chain[-1].pop("base")).read_text()) or {})
        for v in reversed(chain):
            _merge(cfg, v, str(path))
    for item in overrides or []:
        key, sep, text = item.partition("=")
        if not sep:
            raise ValueError(f"override {item!r} is not key=value")
        *sections, leaf = key.strip().split(".")
        nested: dict = {leaf: _parse_value(text)}
        for s in reversed(sections):
            nested = {s: nested}
        _merge(cfg, nested, f"override {item!r}")
    validate(cfg)
    return cfg


def validate(cfg: TrainConfig) -> None:
    t = cfg.train
    if t.global_batch % t.micro_batch:
        raise ValueError(f"train.global_batch {t.global_batch} is not a multiple of train.micro_batch {t.micro_batch}")
    if t.precision not in ("auto", "bf16", "fp32", "fp8"):
        raise ValueError(f"train.precision must be auto, bf16, fp32 or fp8; got {t.precision!r}")
    if cfg.fp8.backend not in ("auto", "torch", "emulated", "torchao", "transformer_engine"):
        raise ValueError(f"fp8.backend must be auto, torch, emulated, torchao or transformer_engine; "
                         f"got {cfg.fp8.backend!r}")
    if cfg.fp8.recipe not in ("tensorwise", "rowwise", "delayed"):
        raise ValueError(f"fp8.recipe must be tensorwise, rowwise or delayed; got {cfg.fp8.recipe!r}")
    if t.parallel not in ("ddp", "fsdp"):
        raise ValueError(f"train.parallel must be ddp or fsdp; got {t.parallel!r}")
    if cfg.optim.schedule not in ("cosine", "constant"):
        raise ValueError(f"optim.schedule must be cosine or constant; got {cfg.optim.schedule!r}")
    if not 0 <= cfg.diffusion.mask_ratio < 1:
        raise ValueError(f"diffusion.mask_ratio must be in [0, 1); got {cfg.diffusion.mask_ratio}")
