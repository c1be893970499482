"""Training configuration: dataclasses with meaningful defaults; YAML files and key=value override them."""
from __future__ import annotations

import dataclasses
import importlib.resources
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ..diffusion.edm import DEFAULT as EDM_DEFAULT, EDMConfig


class ConfigError(ValueError):
    """A configuration key or value that cannot be used; the message names the key, the value and the type."""


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
    # sha256 of every shard, checked in a background thread; a batch is trained on only once its
    # shards are verified. false: header and sample-count checks only (datasets too large to hash).
    verify_checksums: bool = True
    val_fraction: float = 0.0  # the last fraction of the samples, held out for validation (val.*)


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
    # AdamW's fused kernel (one launch for all parameters) or None: fused on CUDA, foreach on the
    # CPU (the CPU's golden curves and resume checks were made with foreach; true opts in).
    fused: bool | None = None


@dataclass
class DiffusionSection:
    """The masking ratio and the EDM constants training sets (defaults: edm.EDMConfig's)."""

    mask_ratio: float = 0.75
    P_mean: float = EDM_DEFAULT.P_mean
    P_std: float = EDM_DEFAULT.P_std
    sigma_data: float = EDM_DEFAULT.sigma_data
    # A noise curriculum (not in the paper): the first `high_noise_steps` steps draw ln(sigma)
    # from N(high_noise_P_mean, high_noise_P_std) instead, where only the caption can say where
    # objects go; a small model then learns the caption -> layout map first (docs/demo_experiments.md,
    # fifth round). 0: off.
    high_noise_steps: int = 0
    high_noise_P_mean: float = 3.0
    high_noise_P_std: float = 0.8
    # Not in the paper (1.0: the published loss): foreground tokens (those standing out from their
    # image's background by more than foreground_threshold * sigma_data) weigh this many times
    # as much in the loss, in the samples noised to sigma >= foreground_sigma_min (0: all;
    # edm.EDMConfig).
    foreground_weight: float = 1.0
    foreground_threshold: float = 1.0
    foreground_sigma_min: float = 0.0

    def edm_config(self, step: int | None = None) -> EDMConfig:
        """These constants as the EDMConfig that edm.loss takes (the sampler's stay EDMConfig's);
        with `step`, the training step's (the curriculum's noise for its first steps)."""
        early = step is not None and step < self.high_noise_steps
        return dataclasses.replace(EDM_DEFAULT, P_mean=self.high_noise_P_mean if early else self.P_mean,
                                   P_std=self.high_noise_P_std if early else self.P_std,
                                   sigma_data=self.sigma_data, foreground_weight=self.foreground_weight,
                                   foreground_threshold=self.foreground_threshold,
                                   foreground_sigma_min=self.foreground_sigma_min)


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
    # Flush denormal floats to zero on the CPU (torch.set_flush_denormal, for the training
    # thread). Tiny gradients and AdamW moments become denormal and x86 arithmetic on them is
    # about 100x slower: on MicroDiT_XL_Tiny_2 it cut AdamW from ~1.3 s to 0.11 s a step and
    # the forward+backward from ~3.5 s to 2.1 s. Off by default only because the CPU golden
    # curves and timed demo runs were made without it; values below 1.2e-38 become 0.
    flush_denormal: bool = False
    parallel: str = "ddp"  # "ddp" or "fsdp" (FSDP2 fully_shard) when world_size > 1
    device: str = "auto"
    init_from: str | None = None  # a previous phase's checkpoint (file or training directory)
    log_every: int = 10
    ckpt_every: int = 500
    keep_checkpoints: int = 3
    # "full": one file of whole tensors, gathered on rank 0; "dcp": a folder of every rank's shards
    # (torch.distributed.checkpoint), resumable on another number of ranks (see train/dcp.py).
    checkpoint: str = "full"
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
class ValSection:
    """Validation during training (microdit.train.validation): off unless `every` > 0."""

    data: str | None = None  # held-out shards (`--val-data`); else data.val_fraction of the training shards
    every: int = 0  # validate at the start, every N steps and at the end (0: never)
    samples: int = 256  # at most this many held-out samples
    batch_size: int = 32  # fixed batches (independent of the rank count)
    sigmas: list = field(default_factory=lambda: [0.05, 0.2, 0.5, 1.0, 2.0, 5.0, 20.0])
    seed: int = 0  # the fixed validation noise
    # FID-K and CLIP score of images generated for the first `fid_samples` held-out captions
    # against those samples' own images, every `fid_every` steps (0: never); needs the data's encoders.
    fid_every: int = 0
    fid_samples: int = 32
    fid_steps: int = 20
    fid_guidance: float = 5.0
    inception: str | None = None  # torch-fidelity's Inception weights (None: torch hub's cache)
    clip_model: str | None = None  # a CLIP folder or hub id for the CLIP score (None: no CLIP score)


@dataclass
class TrainConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    diffusion: DiffusionSection = field(default_factory=DiffusionSection)
    ema: EMASection = field(default_factory=EMASection)
    fp8: FP8Section = field(default_factory=FP8Section)
    train: TrainSection = field(default_factory=TrainSection)
    val: ValSection = field(default_factory=ValSection)
    out: str = "runs/demo"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# YAML 1.1 (PyYAML) reads `1e-4` and `.5e3` as strings; a number field accepts any float spelling.
_FLOAT = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$|^[-+]?(inf|nan)$", re.IGNORECASE)


def _coerce(value, hint, where: str):
    """`value` as the dataclass field type `hint` (str, int, float, bool, tuple, list, dict, X | None)."""
    args = typing.get_args(hint)
    if type(None) in args:  # Optional[X]
        if value is None or (isinstance(value, str) and value.lower() in ("null", "none", "~")):
            return None
        hint = next(a for a in args if a is not type(None))

    def bad(expected: str):
        return ConfigError(f"{where}: expected {expected}, got {value!r} ({type(value).__name__})")

    if hint is bool:
        if isinstance(value, bool):
            return value
        raise bad("a boolean (true or false)")
    if hint is float:
        if isinstance(value, bool):
            raise bad("a number")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str) and _FLOAT.match(value.strip()):
            return float(value)
        raise bad("a number")
    if hint is int:
        if isinstance(value, bool):
            raise bad("an integer")
        if isinstance(value, str) and _FLOAT.match(value.strip()):
            value = float(value)
        if isinstance(value, float) and math.isfinite(value) and value == int(value):
            return int(value)  # 1e3 steps
        if isinstance(value, int):
            return value
        raise bad("an integer")
    if hint is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # a path or name that YAML read as a number, e.g. out=2024
        raise bad("a string")
    if hint in (tuple, list):
        if isinstance(value, (list, tuple)):
            return hint(value)
        raise bad("a list, e.g. [a, b]")
    if hint is dict:
        if isinstance(value, dict):
            return value
        raise bad("a mapping")
    return value


def _merge(obj, values: dict, source: str, prefix: str = ""):
    """Set dataclass fields from a dict, recursing into sections; unknown keys and wrong types are errors."""
    names = {f.name: f for f in dataclasses.fields(obj)}
    hints = typing.get_type_hints(type(obj))
    for key, value in values.items():
        where = f"{source}: {prefix}{key}"
        if key not in names:
            raise ConfigError(f"{source}: unknown key {key!r} in {prefix.rstrip('.') or 'the top level'} "
                              f"(known: {', '.join(names)})")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"{where}: expected a mapping of its settings, got {value!r}")
            _merge(current, value, source, f"{prefix}{key}.")
        elif isinstance(current, dict) and isinstance(value, dict):
            setattr(obj, key, {**current, **value})  # dict settings merge key by key
        else:
            setattr(obj, key, _coerce(value, hints[key], where))


def _parse_value(text: str):
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text  # not YAML (say `a: b: c`): the string itself, checked against the field's type


def _load_yaml(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:  # a stream, so that YAML's messages name the file
            values = yaml.safe_load(f)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top, got {type(values).__name__}")
    return values


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
        chain = [(path, _load_yaml(path))]
        while "base" in chain[-1][1]:
            base = resolve_config_path(chain[-1][1].pop("base"))
            chain.append((base, _load_yaml(base)))
        for where, v in reversed(chain):
            _merge(cfg, v, str(where))
    for item in overrides or []:
        key, sep, text = item.partition("=")
        if not sep:
            raise ConfigError(f"override {item!r} is not key=value")
        *sections, leaf = key.strip().split(".")
        nested: dict = {leaf: _parse_value(text)}
        for s in reversed(sections):
            nested = {s: nested}
        _merge(cfg, nested, f"override {item!r}")
    validate(cfg)
    return cfg


# Range of each numeric setting: (low, high, low inclusive, high inclusive); None is unbounded.
_RANGES = {
    "data.num": (1, None, True, True), "data.resolution": (1, None, True, True),
    "data.caption_len": (1, None, True, True), "data.num_workers": (0, None, True, True),
    "data.caption_dropout": (0, 1, True, True),
    "optim.lr": (0, None, False, True), "optim.eps": (0, None, False, True),
    "optim.weight_decay": (0, None, True, True), "optim.moe_lr_factor": (0, None, True, True),
    "optim.warmup_steps": (0, None, True, True), "optim.min_lr_ratio": (0, 1, True, True),
    "optim.grad_clip": (0, None, False, True),
    "diffusion.P_std": (0, None, False, True), "diffusion.sigma_data": (0, None, False, True),
    "diffusion.high_noise_steps": (0, None, True, True), "diffusion.high_noise_P_std": (0, None, True, True),
    "diffusion.foreground_weight": (0, None, False, True),
    "diffusion.foreground_threshold": (0, None, True, True),
    "diffusion.foreground_sigma_min": (0, None, True, True),
    "ema.decay": (0, 1, True, True), "ema.start_step": (0, None, True, True),
    "train.steps": (1, None, True, True), "train.global_batch": (1, None, True, True),
    "train.micro_batch": (1, None, True, True), "train.log_every": (1, None, True, True),
    "train.ckpt_every": (0, None, True, True), "train.keep_checkpoints": (0, None, True, True),
    "train.sample_every": (0, None, True, True), "train.sample_steps": (1, None, True, True),
    "train.max_bad_steps": (1, None, True, True),
}


def _check_range(key: str, value, lo, hi, lo_in, hi_in) -> None:
    ok = (lo is None or (value >= lo if lo_in else value > lo)) and (hi is None or (value <= hi if hi_in else value < hi))
    if not ok or (isinstance(value, float) and math.isnan(value)):
        left, right = ("[" if lo_in else "(") + ("-inf" if lo is None else str(lo)), \
            ("inf" if hi is None else str(hi)) + ("]" if hi_in else ")")
        raise ConfigError(f"{key}: {value!r} is out of range, expected a value in {left}, {right}")


def validate(cfg: TrainConfig) -> None:
    """Ranges and choices of every setting; ConfigError names the key and the value."""
    for key, bounds in _RANGES.items():
        section, name = key.split(".")
        _check_range(key, getattr(getattr(cfg, section), name), *bounds)
    betas = cfg.optim.betas
    if len(betas) != 2 or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in betas):
        raise ConfigError(f"optim.betas: {list(betas)!r} must be two numbers in [0, 1)")
    t = cfg.train
    if t.global_batch % t.micro_batch:
        raise ConfigError(f"train.global_batch {t.global_batch} is not a multiple of train.micro_batch {t.micro_batch}")
    if t.precision not in ("auto", "bf16", "fp32", "fp8"):
        raise ConfigError(f"train.precision must be auto, bf16, fp32 or fp8; got {t.precision!r}")
    if cfg.fp8.backend not in ("auto", "torch", "emulated", "torchao", "transformer_engine"):
        raise ConfigError(f"fp8.backend must be auto, torch, emulated, torchao or transformer_engine; "
                          f"got {cfg.fp8.backend!r}")
    if cfg.fp8.recipe not in ("tensorwise", "rowwise", "delayed"):
        raise ConfigError(f"fp8.recipe must be tensorwise, rowwise or delayed; got {cfg.fp8.recipe!r}")
    if t.checkpoint not in ("full", "dcp"):
        raise ConfigError(f"train.checkpoint must be full or dcp; got {t.checkpoint!r}")
    if t.parallel not in ("ddp", "fsdp"):
        raise ConfigError(f"train.parallel must be ddp or fsdp; got {t.parallel!r}")
    if cfg.optim.schedule not in ("cosine", "constant"):
        raise ConfigError(f"optim.schedule must be cosine or constant; got {cfg.optim.schedule!r}")
    if not 0 <= cfg.diffusion.mask_ratio < 1:
        raise ConfigError(f"diffusion.mask_ratio must be in [0, 1); got {cfg.diffusion.mask_ratio}")
