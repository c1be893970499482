"""The ops a model runs, each with its backend choice: built once, then handed to the model.

    ops = build_ops({"moe": "cpp"})     # config choices; MICRODIT_BACKEND; else automatic
    model = MicroDiT(config, ops=ops)   # create_model / MicroDiT(config) build one from config.backends
    ops.mask_tokens(x, ids_keep)        # = mask_tokens_op(x, ids_keep, backend=<the choice>)

`build_ops` checks the names and resolves every explicit choice now (argument, then the
`MICRODIT_BACKEND` environment variable), so one that cannot run fails at construction, and
caches each backend's availability before any torch.compile tracing. Ops left automatic pick the
best backend for each call's inputs. `probe_ops` makes the same object without any availability
check, for models that only describe shapes (on the meta device).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from . import import_all
from .registry import ALL_OPS


@dataclass(frozen=True)
class BoundOp:
    """One op with its backend (None: automatic per call)."""

    name: str
    backend: str | None = None

    def __call__(self, *args, **kwargs):
        return ALL_OPS[self.name](*args, backend=self.backend, **kwargs)

    def describe(self) -> str:
        """The backend, or what automatic selection gives on this machine ignoring the inputs."""
        return self.backend or "auto: " + ALL_OPS[self.name].default()


class OpSet:
    """Op name -> BoundOp, also as attributes (`ops.moe`). Immutable; holds only names, so it
    copies and pickles with the model that holds it."""

    def __init__(self, bound: Mapping[str, BoundOp]):
        object.__setattr__(self, "_bound", dict(bound))

    def __getattr__(self, name: str) -> BoundOp:
        if name.startswith("_"):  # not an op; also keeps copy/pickle probes off `_bound` before it is set
            raise AttributeError(name)
        try:
            return self._bound[name]
        except KeyError:
            raise AttributeError(f"no op {name!r} (ops: {', '.join(sorted(self._bound))})") from None

    def __getitem__(self, name: str) -> BoundOp:
        return getattr(self, name)

    def __setattr__(self, name, value):
        raise AttributeError("OpSet is immutable: build a new one with build_ops")

    def __getstate__(self):
        return self._bound

    def __setstate__(self, state):
        object.__setattr__(self, "_bound", state)

    def backends(self) -> dict[str, str | None]:
        """Op name -> the explicit backend, or None where automatic."""
        return {n: b.backend for n, b in self._bound.items()}

    def __repr__(self) -> str:
        return "OpSet(" + ", ".join(f"{n}={b.backend or 'auto'}" for n, b in sorted(self._bound.items())) + ")"


def _checked_names(backends: Mapping[str, str] | None) -> dict[str, str]:
    import_all()
    backends = dict(backends or {})
    unknown = set(backends) - set(ALL_OPS)
    if unknown:
        raise ValueError(f"backends name unknown ops {sorted(unknown)} (ops: {', '.join(sorted(ALL_OPS))})")
    return backends


def build_ops(backends: Mapping[str, str] | None = None) -> OpSet:
    """Every op bound to its backend: `backends[op]` ('auto' or absent: MICRODIT_BACKEND, else
    automatic per call). Raises ValueError for an unknown op name and BackendError for an
    explicit choice that cannot run here."""
    backends = _checked_names(backends)
    return OpSet({name: BoundOp(name, op.warm().resolve(backends.get(name))) for name, op in ALL_OPS.items()})


def probe_ops(backends: Mapping[str, str] | None = None) -> OpSet:
    """Like build_ops, but with no availability check or environment lookup: for a model that is
    built only to list its tensors' shapes (e.g. on the meta device) and never runs."""
    backends = _checked_names(backends)
    return OpSet({name: BoundOp(name, None if backends.get(name) in (None, "auto") else backends[name])
                  for name in ALL_OPS})
