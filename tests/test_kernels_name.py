"""The checkout's kernels/ folder (microdit.kernels) never shadows PyPI's `kernels` package.

transformers >= 5 imports Hugging Face's `kernels`; with the checkout's root first on sys.path
(`python -m microdit.cli` from it, as `make demo` runs, or pytest's `pythonpath = .`) the folder
used to be found instead, and loading any transformers text encoder failed."""
import importlib.metadata
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_top_level_kernels_is_the_pypi_package():
    try:
        importlib.metadata.version("kernels")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("PyPI's kernels is not installed here")
    where = _run("import sys; sys.path.insert(0, ''); import kernels; print(kernels.__file__)")
    assert not Path(where).resolve().is_relative_to(ROOT / "kernels"), where
    assert _run("import sys; sys.path.insert(0, ''); from kernels import Device; print('ok')") == "ok"


def test_without_the_pypi_package_kernels_is_missing_and_ours_still_imports():
    code = ("import sys; sys.path[:] = [''] + [p for p in sys.path if 'site-packages' not in p]\n"
            "try:\n    import kernels\nexcept ModuleNotFoundError as e:\n    print('missing', e.name, 'kernels' in sys.modules)\n")
    assert _run(code) == "missing kernels False"
    where = _run("import microdit.kernels as k; print(k.__file__)")
    assert Path(where).resolve() == (ROOT / "kernels" / "__init__.py").resolve()
