"""Builds microdit and its compiled extension `microdit._C` through CMake (CMakeLists.txt).

Metadata lives in pyproject.toml; this file only adds the extension and the package layout.

Environment:
  MICRODIT_CUDA        auto (default): build the CUDA kernels iff nvcc is found (on PATH, in
                       $CUDA_HOME/bin or /usr/local/cuda/bin); 0: never; 1: always, fail without nvcc
  MICRODIT_CUDA_ARCHS  CUDA architectures, default "80;90" (never queried from a GPU)
  MAX_JOBS             parallel compile jobs (default: all cores)
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    """An extension whose sources CMake finds (globbed from csrc/), not setuptools."""

    def __init__(self, name: str, source_dir: Path = ROOT):
        super().__init__(name, sources=[])
        self.source_dir = Path(source_dir).resolve()


def find_nvcc() -> str | None:
    found = shutil.which("nvcc")
    if found:
        return found
    homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    for home in filter(None, homes):
        nvcc = Path(home, "bin", "nvcc")
        if nvcc.is_file() and os.access(nvcc, os.X_OK):
            return str(nvcc)
    return None


def cuda_compiler() -> str | None:
    """nvcc to build the CUDA kernels with, or None for a CPU-only build (MICRODIT_CUDA)."""
    mode = os.environ.get("MICRODIT_CUDA", "auto").strip().lower() or "auto"
    if mode not in ("auto", "0", "1"):
        raise RuntimeError(f"MICRODIT_CUDA must be auto, 0 or 1, got {mode!r}")
    if mode == "0":
        return None
    nvcc = find_nvcc()
    if nvcc is None and mode == "1":
        raise RuntimeError(
            "MICRODIT_CUDA=1 but nvcc was not found on PATH, in $CUDA_HOME/bin or in "
            "/usr/local/cuda/bin. Install the CUDA toolkit (or put nvcc on PATH), or build "
            "without CUDA with MICRODIT_CUDA=0."
        )
    return nvcc


def cuda_archs() -> str:
    """MICRODIT_CUDA_ARCHS as a CMake list; commas and spaces are accepted as separators."""
    raw = os.environ.get("MICRODIT_CUDA_ARCHS", "").strip() or "80;90"
    archs = [a for a in re.split(r"[;,\s]+", raw) if a]
    bad = [a for a in archs if not re.fullmatch(r"\d+[af]?(-real|-virtual)?", a)]
    if bad or not archs:
        raise RuntimeError(
            f"MICRODIT_CUDA_ARCHS={raw!r} is not a list of CUDA architectures like '80;90' "
            f"(bad entries: {bad})"
        )
    return ";".join(archs)


def tool(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        raise RuntimeError(f"{name} not found on PATH; `pip install {name}` (a build requirement)")
    return found


class CMakeBuild(build_ext):
    """Configures and builds CMakeLists.txt with Ninja, putting _C where setuptools expects it."""

    def build_extension(self, ext: Extension) -> None:
        if not isinstance(ext, CMakeExtension):
            return super().build_extension(ext)
        # setuptools decides where the file goes (build/lib... or, for editable installs, a
        # staging dir it copies into the source tree); CMake only has to write it there.
        ext_path = Path(self.get_ext_fullpath(ext.name)).resolve()
        stem = ext.name.rsplit(".", 1)[-1]
        nvcc = cuda_compiler()

        # A fixed build tree (not setuptools' build_temp, a fresh temporary directory for
        # editable installs) so that rebuilds only recompile what changed.
        tag = f"{sysconfig.get_platform()}-{sys.implementation.cache_tag}-{'cuda' if nvcc else 'cpu'}"
        build_dir = ext.source_dir / "build" / f"cmake-{tag}"
        discard_foreign_cache(build_dir, ext.source_dir)
        build_dir.mkdir(parents=True, exist_ok=True)

        pybind11_dir = subprocess.run(
            [sys.executable, "-m", "pybind11", "--cmakedir"],
            check=True, capture_output=True, text=True,
        ).stdout.strip()
        configure = [
            tool("cmake"), "-S", str(ext.source_dir), "-B", str(build_dir),
            "-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={tool('ninja')}",
            "-DCMAKE_BUILD_TYPE=Release",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11_dir}",
            f"-DMICRODIT_OUTPUT_DIR={ext_path.parent}",
            f"-DMICRODIT_EXT_SUFFIX={ext_path.name[len(stem):]}",
            f"-DMICRODIT_VERSION={self.distribution.get_version()}",
            f"-DMICRODIT_CUDA={'ON' if nvcc else 'OFF'}",
        ]
        if nvcc:
            configure += [f"-DCMAKE_CUDA_COMPILER={nvcc}", f"-DMICRODIT_CUDA_ARCHS={cuda_archs()}"]
        jobs = os.environ.get("MAX_JOBS", "").strip() or str(os.cpu_count() or 1)
        if not jobs.isdigit() or int(jobs) < 1:
            raise RuntimeError(f"MAX_JOBS must be a positive integer, got {jobs!r}")

        print(f"microdit: building {ext.name} ({'CUDA ' + cuda_archs() if nvcc else 'CPU only'}) "
              f"in {build_dir}", flush=True)
        subprocess.run(configure, check=True)
        subprocess.run([tool("cmake"), "--build", str(build_dir), "-j", jobs], check=True)
        if not ext_path.is_file():
            raise RuntimeError(f"CMake finished but did not produce {ext_path}")


def discard_foreign_cache(build_dir: Path, source_dir: Path) -> None:
    """Removes a build tree configured for another source tree (a copied checkout), which
    CMake would otherwise refuse to reuse."""
    cache = build_dir / "CMakeCache.txt"
    if not cache.is_file():
        return
    match = re.search(r"^CMAKE_HOME_DIRECTORY:INTERNAL=(.*)$", cache.read_text(), re.M)
    if match and Path(match.group(1)).resolve() != source_dir:
        shutil.rmtree(build_dir)


if __name__ == "__main__":  # also what setuptools' build backend runs; tests import find_nvcc alone
    setup(
        packages=find_packages(include=["microdit", "microdit.*"]) + ["microdit.kernels", "microdit.configs"],
        package_dir={"microdit.kernels": "kernels", "microdit.configs": "configs"},
        package_data={"microdit.configs": ["*.yaml"]},
        ext_modules=[CMakeExtension("microdit._C")],
        cmdclass={"build_ext": CMakeBuild},
        zip_safe=False,
    )
