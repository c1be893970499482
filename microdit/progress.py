"""Progress bars: tqdm when it is installed, else (optionally) a line on stderr every few seconds."""
from __future__ import annotations

import sys
import time


class Progress:
    """A bar over `total` units, from `initial`; disabled, every call is a no-op. Without tqdm,
    `fallback_every` seconds (None: never) a line `desc: n/total items (p%), r items/s`."""

    def __init__(self, total: int, *, desc: str, unit: str, initial: int = 0, enabled: bool = True,
                 leave: bool = True, fallback_every: float | None = 2.0):
        from .availability import tqdm

        self.total, self.n, self.start, self.desc = total, initial, initial, desc
        self.enabled, self.fallback_every = enabled, fallback_every
        self.t0 = self.last = time.perf_counter()
        self.bar = None
        if enabled and tqdm():
            self.bar = tqdm().tqdm(total=total, initial=initial, unit=unit, desc=desc, leave=leave,
                                   dynamic_ncols=True, file=sys.stderr)

    def update(self, k: int = 1) -> None:
        self.n += k
        if self.bar is not None:
            self.bar.update(k)
        elif self.enabled and self.fallback_every is not None and (
                time.perf_counter() - self.last > self.fallback_every or self.n == self.total):
            self.last = time.perf_counter()
            rate = (self.n - self.start) / max(self.last - self.t0, 1e-9)
            print(f"{self.desc}: {self.n}/{self.total} items ({100 * self.n / max(self.total, 1):.0f}%), "
                  f"{rate:.0f} items/s", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
