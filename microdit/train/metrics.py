"""What users watch: a progress bar, metrics as JSON lines and (when installed) TensorBoard."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from .. import availability


class ProgressBar:
    """steps, loss, images/s and ETA on one line (stderr); silent on non-main ranks."""

    def __init__(self, total: int, initial: int = 0, enabled: bool = True, stream=None):
        self.total, self.enabled = total, enabled
        self.stream = stream or sys.stderr
        self.start_time, self.start_step = time.perf_counter(), initial
        self.tty = getattr(self.stream, "isatty", lambda: False)()

    def update(self, step: int, **values) -> None:
        if not self.enabled:
            return
        done = step - self.start_step
        elapsed = time.perf_counter() - self.start_time
        eta = elapsed / done * (self.total - step) if done > 0 else float("nan")
        width = 24
        filled = int(width * step / max(self.total, 1))
        parts = [f"{k} {v:.4g}" for k, v in values.items()]
        line = (f"[{'#' * filled}{'.' * (width - filled)}] {step}/{self.total} " + " ".join(parts)
                + f" ETA {_hms(eta)}")
        self.stream.write(("\r" + line) if self.tty else (line + "\n"))
        self.stream.flush()

    def close(self) -> None:
        if self.enabled and self.tty:
            self.stream.write("\n")


def _hms(seconds: float) -> str:
    if seconds != seconds:
        return "?"
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class MetricsWriter:
    """Appends {"step", metrics...} to OUT/metrics.jsonl and to TensorBoard under OUT/tb when available."""

    def __init__(self, out: Path, enabled: bool = True, tensorboard: bool = True):
        self.enabled = enabled
        self.tb = None
        if not enabled:
            return
        out.mkdir(parents=True, exist_ok=True)
        self.file = open(out / "metrics.jsonl", "a")
        if tensorboard:
            if availability.tensorboard():
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(out / "tb"))
            else:
                import logging

                logging.getLogger("microdit.train").info(
                    "TensorBoard logs off: %r (metrics still go to metrics.jsonl)", availability.tensorboard())

    def log(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps({"step": step, **metrics}) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in metrics.items():
                self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            if self.tb is not None:
                self.tb.close()
