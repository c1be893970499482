"""State-dict helpers shared by checkpoint loading, training resume and the optimizer's groups."""
from __future__ import annotations

from collections.abc import Iterable, Mapping

# What wrappers put in front of parameter names: DDP / FSDP1 (`module.`), torch.compile (`_orig_mod.`).
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def strip_prefixes(name: str, prefixes: Iterable[str] = WRAPPER_PREFIXES) -> str:
    """`name` without any leading run of `prefixes` (only at the start: `blocks.0.submodule.w`
    keeps its `module.`)."""
    prefixes = tuple(prefixes)
    while True:
        for p in prefixes:
            if name.startswith(p):
                name = name[len(p):]
                break
        else:
            return name


def shape_mismatches(expected: Mapping, given: Mapping) -> tuple[list[str], list[str], list[str]]:
    """(keys whose shapes differ, keys `given` lacks, keys `given` has that `expected` does not),
    in `expected`'s order (the extra ones sorted); values are tensors or shapes."""
    shape = lambda v: tuple(getattr(v, "shape", v))
    differ = [k for k in expected if k in given and shape(given[k]) != shape(expected[k])]
    missing = [k for k in expected if k not in given]
    extra = sorted(set(given) - set(expected))
    return differ, missing, extra
