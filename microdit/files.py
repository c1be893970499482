"""Atomic file writes: a temporary file beside the target, fsynced, renamed over it, the folder fsynced.

Every file microdit writes that a crash must never leave half-written (shards, their index,
training checkpoints, published-format and save_pretrained weights) goes through `atomic_path`.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path

# In every temporary file's name: what sweeps of a killed run's leftovers look for.
TMP_MARK = ".tmp-"


def fsync_dir(path) -> None:
    """Make a rename in `path` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path, tmp=None):
    """Yields a temporary path to write `path`'s contents to (default `<name>.tmp-<pid>` beside
    it); once the block ends without error the file is fsynced and renamed over `path`, and the
    folder fsynced; on any error the temporary file is removed and the target left as it was."""
    path = Path(path)
    tmp = Path(tmp) if tmp is not None else path.with_name(f"{path.name}{TMP_MARK}{os.getpid()}")
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
