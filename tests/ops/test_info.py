"""`python -m microdit.info` lists every op and every backend, available or not, with reasons."""
import subprocess
import sys

from microdit import info
from microdit.ops.registry import ALL_OPS


def test_report_lists_every_op_and_backend():
    text = info.report()
    for name in ("keep_indices", "mask_tokens", "unmask_tokens", "unmask_unpatchify", "moe"):
        assert f"op {name}:" in text
    for name, op in ALL_OPS.items():
        block = text.split(f"op {name}:")[1].split("\nop ")[0]
        for backend, _, reasons in op.table():
            line = next(l for l in block.splitlines() if l.strip().startswith(backend + " "))
            assert ("unavailable: " + "; ".join(reasons)) in line if reasons else line.endswith("available")


def test_module_runs():
    run = subprocess.run([sys.executable, "-m", "microdit.info"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and "op moe:" in run.stdout and "triton" in run.stdout
