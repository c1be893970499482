"""SIGTERM / SIGINT during training: finish the step, save a checkpoint, exit with EXIT_INTERRUPTED.

Cluster schedulers preempt with SIGTERM and users press Ctrl-C; either way the work since the
last checkpoint is worth one more save. The first signal only sets a flag that the trainer reads
at the next step boundary; a second one restores the default action and re-sends itself, so a
user who means "now" is obeyed at once.
"""
from __future__ import annotations

import logging
import os
import signal
import threading

log = logging.getLogger("microdit.train")

# EX_TEMPFAIL from sysexits.h: "try again later", i.e. run again with --resume. Distinct from 0
# (done), 1 (error), 2 (usage) and 128 + N (killed by signal N before any save).
EXIT_INTERRUPTED = 75
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class TrainingInterrupted(SystemExit):
    """Training stopped on a signal after saving a checkpoint; exits with EXIT_INTERRUPTED when not caught."""

    def __init__(self, signum: int, step: int, checkpoint):
        super().__init__(EXIT_INTERRUPTED)
        self.signum, self.step, self.checkpoint = signum, step, checkpoint

    def __str__(self) -> str:
        return (f"interrupted by {signal.Signals(self.signum).name} at step {self.step}: checkpoint saved to "
                f"{self.checkpoint}; continue with --resume (exit status {EXIT_INTERRUPTED})")


class StopSignals:
    """While active, the first SIGTERM/SIGINT sets `signum`; a second one exits at once."""

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict = {}

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:  # the second signal: the default action, now
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.signum = signum
        log.warning("received %s: saving a checkpoint at the end of this step (send it again to exit at once)",
                    signal.Signals(signum).name)

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():  # Python delivers signals there only
            for s in STOP_SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()
