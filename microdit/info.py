"""`python -m microdit.info`: every op, every backend, available or not, and why."""
from __future__ import annotations

import platform

import torch

from . import availability
from . import fp8  # noqa: F401  (registers the fp8_linear op: its backends are model conversions)
from .ops import import_all
from .ops.registry import ALL_OPS

import_all()  # importing the op modules registers the ops


def report() -> str:
    lines = [f"microdit on Python {platform.python_version()}, torch {torch.__version__}, "
             f"CUDA device: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}"]
    ext = availability.extension()
    if ext:
        info = ext.build_info()
        lines.append("extension microdit._C: " + ", ".join(f"{k}={v}" for k, v in info.items()))
    else:
        lines.append(f"extension microdit._C: not available ({ext!r})")
    tri = availability.triton()
    lines.append(f"triton: {tri.__version__ if tri else repr(tri)}"
                 + (" (TRITON_INTERPRET=1)" if availability.triton_interpret() else ""))
    for name, op in sorted(ALL_OPS.items()):
        try:
            default = op.default()
        except Exception as e:  # no backend at all is worth reporting, not crashing on
            default = f"none ({e})"
        lines.append(f"\nop {name}: {op.doc}  [default here: {default}]")
        for backend, priority, reasons in op.table():
            state = "available" if not reasons else "unavailable: " + "; ".join(reasons)
            lines.append(f"  {backend:<12} priority {priority:>3}  {state}")
    return "\n".join(lines)


def main() -> None:
    print(report())


if __name__ == "__main__":
    main()
