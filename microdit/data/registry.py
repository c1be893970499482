"""What image codecs (data/codecs.py) and text encoders (data/text_encoders.py) share: the base
class `Encoder` (device, `to`, rebuilding from metadata) and `Family`, the classes of one kind of
encoder by the name a spec gives them (`SCHEME:...`, e.g. `pixels:2`, `openclip:...`; a spec
without a known scheme is a path or hub id) and by the `kind` their metadata records.

A new encoder class is decorated with its family's `register` and sets `kind` and `scheme`; it
overrides `from_spec` when its spec carries options (e.g. `pixels:F:SCALE`) and
`recorded_options` to pass the constructor what its `metadata()` records.
"""
from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)

__all__ = ["Encoder", "Family"]


class Encoder:
    """Base of ImageCodec and TextEncoder: a device, weights that `to` moves, a spec and a kind."""

    kind: str = ""  # what metadata()["kind"] records; the family rebuilds the encoder by it
    scheme: str = ""  # the SCHEME of the `SCHEME:...` specs that name this class
    name: str = ""
    weights_attr: str | None = None  # the attribute holding the torch module `to` moves, if any

    def __init__(self, device="cpu"):
        self.device = torch.device(device)

    def to(self, device):
        """Move the weights (if any) to `device`; returns self."""
        self.device = torch.device(device)
        module = getattr(self, self.weights_attr, None) if self.weights_attr else None
        if module is not None:
            module.to(self.device)
        return self

    def metadata(self) -> dict:
        """JSON-able description from which the family's `from_metadata` rebuilds this encoder."""
        raise NotImplementedError

    @classmethod
    def from_spec(cls, spec: str, **kw):
        """The encoder that `spec` names (`SCHEME:` prefix optional); kw go to the constructor."""
        return cls(spec.removeprefix(f"{cls.scheme}:"), **kw)

    @classmethod
    def recorded_options(cls, meta: dict) -> dict:
        """Constructor options that `meta` (from `metadata()`) records, besides the spec."""
        return {}

    @classmethod
    def rebuild(cls, spec: str | None, meta: dict, **kw):
        """The encoder `meta` describes, from `spec` (the recorded one or an override); kw win over recorded options."""
        return cls(spec, **{**cls.recorded_options(meta), **kw})


class Family:
    """The encoder classes of one family, found by spec scheme (`get`) or recorded kind (`from_metadata`)."""

    def __init__(self, what: str, base: type, *, fallback: str, hint: str, shape_keys: tuple[str, ...]):
        self.what = what  # "image codec", "text encoder": names the family in errors
        self.base = base
        self.fallback = fallback  # the scheme of the class that a spec without a known scheme names
        self.hint = hint  # the specs to suggest when a spec is empty
        self.shape_keys = shape_keys  # metadata that a rebuilt encoder must match exactly
        self.by_kind: dict[str, type] = {}
        self.by_scheme: dict[str, type] = {}

    def register(self, cls: type) -> type:
        """Class decorator: specs `cls.scheme:...` and metadata of kind `cls.kind` now build `cls`."""
        if not issubclass(cls, self.base):
            raise TypeError(f"{cls.__name__} is not a {self.base.__name__}")
        for table, key, what in ((self.by_kind, cls.kind, "kind"), (self.by_scheme, cls.scheme, "scheme")):
            if not key or key in table:
                taken = f"taken by {table[key].__name__}" if key in table else "empty"
                raise ValueError(f"{self.what} {cls.__name__}: its {what} {key!r} is {taken}")
            table[key] = cls
        return cls

    def get(self, spec, **kw):
        """An encoder of this family: `spec` is one already, a `SCHEME:...` string, or a path / hub id."""
        if isinstance(spec, self.base):
            return spec
        spec = str(spec).strip()
        if not spec:
            raise ValueError(f"empty {self.what} spec: use {self.hint}")
        cls = self.by_scheme.get(spec.partition(":")[0]) or self.by_scheme[self.fallback]
        return cls.from_spec(spec, **kw)

    def from_metadata(self, meta: dict, **kw):
        """Rebuild the encoder that `meta` (from its `metadata()`) describes; kw override (e.g. spec=, device=)."""
        kind = meta.get("kind")
        cls = self.by_kind.get(kind)
        if cls is None:
            raise ValueError(f"unknown {self.what} kind {kind!r} in metadata {meta!r}")
        spec = kw.pop("spec", None) or meta.get("spec")
        obj = cls.rebuild(spec, meta, **kw)
        _check_rebuilt(obj, meta, self.shape_keys)
        return obj


def _check_rebuilt(obj, meta: dict, keys: tuple[str, ...]) -> None:
    """Raise if a rebuilt encoder's shapes differ from the recorded ones; warn if its weights do."""
    now = obj.metadata()
    diff = [f"{k}: {meta[k]!r} recorded, {now[k]!r} now" for k in keys if k in meta and meta[k] != now[k]]
    if diff:
        raise ValueError(f"{obj.name} is not the encoder recorded in the metadata: " + "; ".join(diff))
    same_dtype = meta.get("dtype") == now.get("dtype")
    if same_dtype and meta.get("fingerprint") and meta["fingerprint"] != now.get("fingerprint"):
        # A compatible fine-tune (such as an fp16-fix VAE) is legitimate, so only warn.
        log.warning("%s: weights differ from those recorded in the metadata (fingerprint %s, now %s)",
                    obj.name, meta["fingerprint"], now.get("fingerprint"))
