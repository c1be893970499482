"""Training checkpoints: atomic writes, a `latest` pointer, retention, and fallback past a bad file.

A checkpoint is one file `step_XXXXXXXX.pt` holding model, EMA, optimizer, step, data position
and every RNG state. It is written to a temporary file, fsynced and renamed, then `latest` is
rewritten the same way: a crash at any point leaves the previous checkpoint intact and pointed to.
"""
from __future__ import annotations

import logging
import os
import pickle
import re
import shutil
from pathlib import Path

import torch

from ..files import atomic_path

log = logging.getLogger("microdit.train")
FORMAT = "microdit-train-checkpoint/1"
_NAME = re.compile(r"step_(\d{8})\.(pt|dcp)$")  # .dcp: a sharded checkpoint folder (train/dcp.py)


class TrainCheckpointError(RuntimeError):
    """A training checkpoint that cannot be used; the message names the file and the problem."""


class UnsafeCheckpointError(TrainCheckpointError):
    """A file that would run code when unpickled: refused, never skipped past or loaded another way."""


class _Writer:
    """A file that remembers the OSError of a failed write: torch.save reports a full disk only as
    `unexpected pos`, so the real cause (ENOSPC, EIO, ...) is kept here and raised instead."""

    def __init__(self, f, path: Path):
        self.f, self.path, self.error = f, path, None

    def write(self, data) -> int:
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def __getattr__(self, name):
        return getattr(self.f, name)


def _atomic_write(path: Path, write) -> None:
    writer = None
    try:
        with atomic_path(path, path.with_name(f".{path.name}.tmp-{os.getpid()}")) as tmp, open(tmp, "wb") as f:
            writer = _Writer(f, tmp)
            write(writer)
    except Exception as e:
        cause = writer.error if writer is not None and writer.error is not None else e
        if isinstance(cause, OSError):
            raise OSError(cause.errno, f"{cause.strerror or cause}", str(path)) from e
        raise


class CheckpointManager:
    def __init__(self, directory, keep: int = 3):
        self.dir = Path(directory)
        self.keep = keep

    def path_for(self, step: int, kind: str = "pt") -> Path:
        return self.dir / f"step_{step:08d}.{kind}"

    def list(self) -> list[Path]:
        """Checkpoint files (and DCP folders), oldest first."""
        if not self.dir.exists():
            return []
        return sorted((p for p in self.dir.iterdir() if _NAME.match(p.name)), key=lambda p: (p.name[:13], p.name))

    def save(self, state: dict, step: int) -> Path:
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.path_for(step)
        _atomic_write(path, lambda f: torch.save({"format": FORMAT, "step": step, **state}, f))
        self.commit(path)
        return path

    def commit(self, path: Path) -> None:
        """Point `latest` at the newly written `path`, then drop checkpoints beyond `keep`."""
        _atomic_write(self.dir / "latest", lambda f: f.write(path.name.encode() + b"\n"))
        for old in self.list()[: -self.keep] if self.keep > 0 else []:
            shutil.rmtree(old) if old.is_dir() else old.unlink(missing_ok=True)

    def load_latest(self, sharded: bool = False) -> tuple[dict, Path] | None:
        """The newest readable checkpoint (by `latest`, then by step), or None if there is none.

        With `sharded`, a DCP folder gives only its non-tensor state (`dcp.read_extra`, with
        `tensor_shapes`): the caller loads the shards into its own layout."""
        candidates = self.list()[::-1]
        pointer = self.dir / "latest"
        if pointer.exists():
            named = self.dir / pointer.read_text().strip()
            if named in candidates:
                candidates.remove(named)
                candidates.insert(0, named)
        for path in candidates:
            try:
                if sharded and path.is_dir():
                    from . import dcp

                    return dcp.read_extra(path), path
                return load_checkpoint(path), path
            except UnsafeCheckpointError:
                raise  # a planted file is reported, not skipped in favour of an older one
            except TrainCheckpointError as e:
                log.warning("skipping unusable checkpoint: %s", e)
        return None


def safe_load(path):
    """`torch.load` of tensors and plain data only; a file that would run code raises UnsafeCheckpointError.

    We write nothing else (RNG states are stored as tensors), so anything else is a foreign or
    planted file and is never unpickled. Other failures (truncation, not a torch file) propagate.
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL (\S+)", str(e))
        what = f"it calls or builds {found.group(1)}" if found else "it holds Python objects, not only tensors and data"
        raise UnsafeCheckpointError(
            f"{path}: refused to unpickle ({what}); "
            "microdit never writes such a file, so it is foreign or tampered with: do not load it") from None


def load_checkpoint(path) -> dict:
    """Read a training checkpoint (a .pt file or a DCP folder, whole tensors either way); a truncated or
    foreign file raises TrainCheckpointError naming it."""
    path = Path(path)
    if path.is_dir():
        from . import dcp

        state = dcp.load_full(path)
        if state.get("format") != FORMAT:
            raise TrainCheckpointError(f"{path}: not a microdit DCP training checkpoint")
        return state
    try:
        state = safe_load(path)
    except UnsafeCheckpointError:
        raise
    except Exception as e:
        raise TrainCheckpointError(f"{path}: unreadable ({type(e).__name__}: {e})") from e
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise TrainCheckpointError(f"{path}: not a microdit training checkpoint (format {state.get('format') if isinstance(state, dict) else type(state).__name__!r})")
    for key in ("model", "optimizer", "step", "rng", "config"):
        if key not in state:
            raise TrainCheckpointError(f"{path}: missing {key!r}")
    return state


def resolve_checkpoint(path) -> Path:
    """A checkpoint file, or a training output directory meaning its latest checkpoint."""
    p = Path(path)
    if p.is_file() or (p.is_dir() and _NAME.match(p.name)):
        return p
    for d in (p / "checkpoints", p):
        if (d / "latest").exists():
            named = d / (d / "latest").read_text().strip()
            if named.exists():
                return named
        found = CheckpointManager(d).list()
        if found:
            return found[-1]
    raise FileNotFoundError(f"no checkpoint at {p} (expected a .pt file or a training directory with checkpoints/)")
