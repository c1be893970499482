"""Runs the Triton tests (tests/kernels) in the interpreter, in a subprocess.

Triton decides when it is imported whether it interprets (TRITON_INTERPRET=1) or compiles its
kernels, its own library functions included, and other tests import it first (torch.compile
does, even with backend="eager"). Setting the variable inside this process would therefore
work or not depending on test order, and would make Triton the automatic choice for CPU tensors
in every later test. A fresh interpreter with TRITON_INTERPRET=1 from the start is reliable.
"""
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                    reason="triton is not installed (pip install 'microdit[triton]'): Triton backends unavailable")
def test_triton_kernels_in_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    # Everything in tests/kernels but the ahead-of-time compilation checks (they need compiled,
    # not interpreted, kernels and run in the main process).
    modules = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests" / "kernels").glob("test_*.py")
                     if p.name != "test_triton_compile.py")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *modules]
    run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    tail = (run.stdout + run.stderr)[-6000:]
    assert run.returncode == 0, f"{' '.join(cmd)} (TRITON_INTERPRET=1) failed:\n{tail}"
    assert " passed" in run.stdout and "skipped" not in run.stdout.splitlines()[-1], tail
