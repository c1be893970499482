"""What the image codecs and text encoders share: dtype names, weight fingerprints, and finding a
model by local path or hub id (offline-aware), with readable errors naming what was asked for."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}


def _dtype(dtype) -> torch.dtype:
    """A torch floating dtype from None (float32), a torch.dtype or a name such as 'bf16'."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        if not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating-point type, got {dtype}")
        return dtype
    try:
        return _DTYPES[str(dtype).lower().removeprefix("torch.")]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r} (use one of {sorted(_DTYPES)})") from None


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _fingerprint(module: torch.nn.Module) -> str:
    """A cheap weights fingerprint: tells apart two models with the same config (e.g. a fine-tune)."""
    # Per-tensor digests of shape and a few values, sorted: independent of parameter names and
    # module order, which library versions sometimes change, so old shards still match.
    digests = []
    for p in module.state_dict().values():
        if not torch.is_tensor(p) or p.numel() == 0:
            continue
        flat = p.detach().reshape(-1)
        sample = torch.cat([flat[:512], flat[-512:]]).to("cpu", torch.float32)
        h = hashlib.sha256(repr(tuple(p.shape)).encode())
        h.update(sample.numpy().tobytes())
        digests.append(h.hexdigest())
    return hashlib.sha256("".join(sorted(digests)).encode()).hexdigest()[:16]


# ------------------------------------------------------------------ locating models on disk / hub

def _looks_like_path(spec: str) -> bool:
    """Whether `spec` can only be a filesystem path (a hub id is `name` or `org/name`)."""
    return (spec.startswith(("/", ".", "~")) or "\\" in spec or spec.count("/") > 1
            or Path(spec).suffix in {".safetensors", ".ckpt", ".pt", ".pth", ".bin", ".json"})


def _local_path(spec: str, what: str) -> Path | None:
    """The resolved local path of `spec`, None for a hub id; FileNotFoundError for a missing path."""
    path = Path(spec).expanduser()
    if path.exists():
        return path.resolve()
    if _looks_like_path(spec):
        raise FileNotFoundError(f"{what} {spec!r}: no such file or folder")
    return None


def _hf_offline() -> bool:
    return any(os.environ.get(k, "").upper() in {"1", "ON", "YES", "TRUE"}
               for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _from_hub(load, repo_id: str, what: str, **kw):
    """`load(repo_id, **kw)` from the Hugging Face cache, else from the hub; a clear OSError if neither works."""
    try:
        return load(repo_id, local_files_only=True, **kw)
    except Exception as e:  # not cached: try the hub unless told we are offline
        err = e
    if not _hf_offline():
        try:
            return load(repo_id, **kw)
        except Exception as e:
            err = e
    reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    sub = f" (subfolder {kw['subfolder']!r})" if kw.get("subfolder") else ""
    raise OSError(
        f"cannot load {what} {repo_id!r}{sub}: it is not a local folder, not in the Hugging Face "
        f"cache{'' if _hf_offline() else ', and the hub could not be reached or has no such model'} "
        f"({reason}). Download it on a machine with internet (`hf download {repo_id}`) into the "
        f"cache that HF_HOME points to, or into a folder and pass that folder's path.") from err


def _read_config(folder: Path, what: str) -> dict:
    path = folder / "config.json"
    if not path.is_file():
        raise ValueError(f"{folder} is not a {what} folder: it has no config.json")
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: unreadable config ({e})") from e


def _version_at_least(module, major: int, minor: int) -> bool:
    parts = str(getattr(module, "__version__", "0.0")).split(".")
    try:
        return (int(parts[0]), int(parts[1])) >= (major, minor)
    except (IndexError, ValueError):
        return True
