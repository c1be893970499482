"""One run per output directory: an advisory lock on `OUT/.lock`, and the sweep of a dead run's temp files.

The lock is `flock` on a file that records the holder (pid, host, start time). The kernel drops
the lock when its holder dies, however it dies, so a lock file left by a killed run is simply
taken over; a live holder makes a second run fail at once, naming it.
"""
from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import shutil
import socket
import time
from pathlib import Path

log = logging.getLogger("microdit.train")
LOCK_NAME = ".lock"


class RunLockError(RuntimeError):
    """Another live run holds the output directory; the message names it."""


def _holder(text: str) -> str:
    try:
        h = json.loads(text)
        return f"pid {h['pid']} on host {h['host']}, started {h['started']}"
    except (ValueError, KeyError, TypeError):
        return "an unknown holder"


class RunLock:
    """`with RunLock(out):` or acquire()/release(); holding it means no other run writes `out`."""

    def __init__(self, out):
        self.out = Path(out)
        self.path = self.out / LOCK_NAME
        self._file = None

    def acquire(self) -> "RunLock":
        self.out.mkdir(parents=True, exist_ok=True)
        f = open(self.path, "a+", encoding="utf-8")
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            f.seek(0)
            holder = _holder(f.read())
            f.close()
            if e.errno in (errno.EWOULDBLOCK, errno.EACCES):
                raise RunLockError(f"{self.out} is in use by another training run ({holder}; lock file "
                                   f"{self.path})") from None
            # A filesystem without locks (some FUSE mounts): say so rather than refuse to train.
            log.warning("cannot lock %s (%s): concurrent runs into this directory are not detected", self.path, e)
            return self
        f.seek(0)
        previous = f.read().strip()
        if previous:  # the kernel released it: its holder has exited
            log.info("taking over the lock of a run that is no longer running (%s)", _holder(previous))
        f.seek(0)
        f.truncate()
        f.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}) + "\n")
        f.flush()
        self._file = f
        return self

    def release(self) -> None:
        if self._file is not None:
            self._file.seek(0)
            self._file.truncate()  # an empty lock file: nobody holds it
            self._file.close()  # closing drops the flock
            self._file = None

    @property
    def held(self) -> bool:
        return self._file is not None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


def sweep_temp_files(directory, mark: str = ".tmp-") -> list[Path]:
    """Remove temporary files (and folders) of writes that never finished; call only while holding the lock."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    swept = []
    for p in directory.iterdir():
        if p.name.startswith(".") and mark in p.name:
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink(missing_ok=True)
            swept.append(p)
    if swept:
        log.info("removed %d unfinished temporary file(s) of an interrupted save in %s: %s", len(swept), directory,
                 ", ".join(p.name for p in swept[:3]))
    return swept
