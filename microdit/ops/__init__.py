"""The ops: one module per op, microdit/ops/<op>.py, holding its public function, its
`reference` backend (the published computation) and every backend's registration.

Layers with the same name: kernels/<op>.py (Triton), csrc/<op>/ (C++/CUDA), tests/ops/test_<op>.py,
benches/bench_<op>.py. Modules shared by several ops say so in their name: ops/token_rows.py
(the row-copy custom ops behind mask_tokens, unmask_tokens and unmask_unpatchify),
ops/registry.py (Op, backends, selection).
"""
from __future__ import annotations

import importlib

# Modules of this package that are not ops (every other module is one op, microdit/ops/<op>.py).
SHARED_MODULES = frozenset({"registry", "opset", "token_rows"})


def op_modules() -> list[str]:
    """The names of the op modules (each registers its op in registry.ALL_OPS when imported)."""
    import pkgutil

    return sorted(m.name for m in pkgutil.iter_modules(__path__) if m.name not in SHARED_MODULES)


def import_all() -> None:
    """Import every op module, so that registry.ALL_OPS lists every op."""
    for name in op_modules():
        importlib.import_module(f"{__name__}.{name}")
