"""What the Triton kernel modules share: interpreter detection, block sizes, row-block grids.

Every kernels/<op>.py imports triton at module import; microdit/ops/<op>.py imports them only
when a Triton backend runs.
"""
from __future__ import annotations

import os

import triton

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# Rows per program: the interpreter's cost is per program and op, so it gets fewer, larger ones.
ROWS = 64 if INTERPRET else 16


def pow2(n: int, lo: int) -> int:
    """The next power of two >= n, at least `lo` (a block size: tl.arange needs powers of two)."""
    return max(lo, triton.next_power_of_2(int(n)))


def row_blocks(rows: int, cols: int, max_cols: int = 256) -> tuple[tuple[int, int], int]:
    """Grid (row blocks of ROWS, column blocks) and column block size for a (rows, cols) copy."""
    block = min(pow2(cols, 16), max_cols)
    return (triton.cdiv(rows, ROWS), triton.cdiv(cols, block)), block
