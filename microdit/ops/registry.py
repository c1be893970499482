"""One op, several backends: registration and selection.

Selection order: an explicit `backend=` argument (from the caller or a module's config); the
`MICRODIT_BACKEND` environment variable (`reference`, or `mask_tokens=cpp,moe=torch`); else the
available implementation with the highest priority that supports the inputs. An explicit
choice that cannot run raises with its reasons; an automatic fallback logs its choice once.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Callable

import torch

log = logging.getLogger("microdit.ops")

ALL_OPS: dict[str, "Op"] = {}


def _no_reasons(*args, **kwargs) -> list[str]:
    return []


@dataclass(frozen=True)
class Impl:
    """A backend of an op.

    `available()` says why it cannot run on this machine at all; `supports(*args)` says why it
    cannot run these particular inputs (device, dtype, shape). Both return lists of reasons.
    """

    name: str
    fn: Callable
    priority: int
    available: Callable[[], list[str]] = _no_reasons
    supports: Callable[..., list[str]] = _no_reasons


class BackendError(RuntimeError):
    pass


@dataclass
class Op:
    name: str
    doc: str = ""
    impls: dict[str, Impl] = field(default_factory=dict)
    _logged: set = field(default_factory=set)
    # Availability is a property of the machine: computed once per backend, so that calls
    # under torch.compile only look it up (the checks themselves import modules).
    _available: dict = field(default_factory=dict)

    def __post_init__(self):
        ALL_OPS[self.name] = self

    def register(self, name: str, priority: int, available=_no_reasons, supports=_no_reasons):
        """Decorator registering `fn` as backend `name`."""

        def deco(fn):
            self.impls[name] = Impl(name, fn, priority, available, supports)
            self._available.pop(name, None)
            return fn

        return deco

    def reasons(self, name: str) -> list[str]:
        """Why backend `name` cannot run on this machine (cached)."""
        if name not in self._available:
            self._available[name] = list(self.impls[name].available())
        return self._available[name]

    def warm(self) -> "Op":
        """Compute every backend's availability now (before any torch.compile tracing)."""
        for name in self.impls:
            self.reasons(name)
        return self

    def ranked(self) -> list[Impl]:
        return sorted(self.impls.values(), key=lambda i: -i.priority)

    def env_choice(self) -> str | None:
        spec = os.environ.get("MICRODIT_BACKEND", "").strip()
        if not spec:
            return None
        if "=" not in spec:
            return spec if spec in self.impls else None
        for part in spec.split(","):
            op, _, name = part.partition("=")
            if op.strip() == self.name:
                return name.strip()
        return None

    def resolve(self, backend: str | None = None) -> str | None:
        """The explicit choice (argument, then environment) or None for automatic."""
        choice = backend if backend not in (None, "auto") else self.env_choice()
        if choice is None:
            return None
        if choice not in self.impls:
            raise BackendError(
                f"op {self.name!r} has no backend {choice!r} (known: {', '.join(self.impls)})"
            )
        reasons = self.reasons(choice)
        if reasons:
            raise BackendError(f"backend {choice!r} of op {self.name!r} cannot run: " + "; ".join(reasons))
        return choice

    def default(self) -> str:
        """The best backend available on this machine, ignoring the inputs."""
        for impl in self.ranked():
            if not self.reasons(impl.name):
                return impl.name
        raise BackendError(f"op {self.name!r}: no backend available")

    def pick(self, backend: str | None, *args, **kwargs) -> Impl:
        explicit = self.resolve(backend)
        if explicit is not None:
            impl = self.impls[explicit]
            reasons = impl.supports(*args, **kwargs)
            if reasons:
                raise BackendError(
                    f"backend {explicit!r} of op {self.name!r} cannot run these inputs: " + "; ".join(reasons)
                )
            return impl
        first = None
        for impl in self.ranked():
            if self.reasons(impl.name) or impl.supports(*args, **kwargs):
                first = first or impl
                continue
            # Not while torch.compile traces: a logging call is a graph break (it logs in eager).
            if first is not None and (first.name, impl.name) not in self._logged and not torch.compiler.is_compiling():
                self._logged.add((first.name, impl.name))
                log.info("op %s: using backend %r (%r cannot run: %s)", self.name, impl.name,
                         first.name, "; ".join(self.reasons(first.name) + first.supports(*args, **kwargs)))
            return impl
        raise BackendError(f"op {self.name!r}: no backend can run these inputs")

    def __call__(self, *args, backend: str | None = None, **kwargs):
        return self.pick(backend, *args, **kwargs).fn(*args, **kwargs)

    def table(self) -> list[tuple[str, int, list[str]]]:
        """(backend, priority, reasons it cannot run here) for `python -m microdit.info`."""
        return [(i.name, i.priority, self.reasons(i.name)) for i in self.ranked()]
