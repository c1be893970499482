"""Checked wrappers over the compiled extension `microdit._C` (plain functions, no autograd).

The extension takes raw addresses, sizes and a dtype code, so every check of shape, dtype,
device and layout happens here, with errors that name the argument and what was expected.
"""
from __future__ import annotations

import operator
import os

import torch

from .availability import extension, extension_cuda_reasons

# Must match the DType codes in csrc/common.h.
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}
_DTYPE_NAMES = ", ".join(str(d).removeprefix("torch.") for d in DTYPE_CODES)


def _fail(name: str, expected: str, got) -> None:
    raise ValueError(f"{name}: expected {expected}, got {got}")


def _check_tensor(name: str, t, ndim: int, device: torch.device | None = None) -> None:
    if not isinstance(t, torch.Tensor):
        _fail(name, "a torch.Tensor", type(t).__name__)
    if t.dim() != ndim:
        _fail(name, f"a {ndim}-d tensor", f"shape {tuple(t.shape)}")
    if device is not None and t.device != device:
        _fail(name, f"a tensor on {device} (the device of src)", t.device)
    if t.device.type not in ("cpu", "cuda"):
        _fail(name, "a CPU or CUDA tensor", t.device)
    if not t.is_contiguous():
        _fail(name, "a contiguous tensor (call .contiguous())", f"strides {t.stride()}")


def _check_src(src) -> int:
    _check_tensor("src", src, 3)
    if src.dtype not in DTYPE_CODES:
        _fail("src", f"dtype {_DTYPE_NAMES}", src.dtype)
    return DTYPE_CODES[src.dtype]


def _check_idx(idx, batch: int, device: torch.device) -> int:
    _check_tensor("idx", idx, 2, device)
    if idx.dtype != torch.int64:
        _fail("idx", "dtype torch.int64 (call .long())", idx.dtype)
    if idx.shape[0] != batch:
        _fail("idx", f"shape (B={batch}, K) to match src", f"shape {tuple(idx.shape)}")
    return idx.shape[1]


def _check_num_tokens(T, K: int) -> int:
    try:
        n = None if isinstance(T, bool) else operator.index(T)  # ints, numpy ints; not floats
    except TypeError:
        n = None
    if n is None or n < K:
        _fail("T", f"an int >= K = {K} (the number of kept tokens)", repr(T))
    return n


def _output(out, shape: tuple[int, ...], src: torch.Tensor) -> torch.Tensor:
    if out is None:
        return torch.empty(shape, dtype=src.dtype, device=src.device)
    _check_tensor("out", out, len(shape), src.device)
    if tuple(out.shape) != shape or out.dtype != src.dtype:
        _fail("out", f"shape {shape} and dtype {src.dtype}", f"shape {tuple(out.shape)} and dtype {out.dtype}")
    # Rows are copied in parallel, so an out sharing memory with src would read overwritten rows.
    if out.numel() and src.numel() and out.untyped_storage().data_ptr() == src.untyped_storage().data_ptr():
        _fail("out", "a tensor that does not share memory with src", "one that does")
    return out


def _cuda_module(device: torch.device):
    reasons = extension_cuda_reasons()
    if reasons:
        raise RuntimeError(f"cannot run on {device}: " + "; ".join(reasons))
    return extension()


def _check_indices_on_device() -> bool:
    # A CUDA kernel cannot raise; with this set the wrappers read back its out-of-range flag,
    # a host-device sync, so it is meant for debugging only.
    return os.environ.get("MICRODIT_CHECK_INDICES", "0") == "1"


def _launch_cuda(fn, name: str, device: torch.device, *args) -> None:
    with torch.cuda.device(device):
        stream = torch.cuda.current_stream(device).cuda_stream
        if not _check_indices_on_device():
            fn(*args, stream, 0)
            return
        status = torch.zeros((), dtype=torch.int32, device=device)
        fn(*args, stream, status.data_ptr())
        if status.item():
            raise ValueError(f"{name}: idx has entries outside [0, T) (MICRODIT_CHECK_INDICES=1)")


def mask_tokens(src: torch.Tensor, idx: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """(B, T, D), (B, K) int64 -> (B, K, D): out[b, k] = src[b, idx[b, k]].

    On the CPU an index outside [0, T) raises ValueError before anything is written; on CUDA
    it gives a zero row (set MICRODIT_CHECK_INDICES=1 to raise instead, at the cost of a sync).
    """
    dtype = _check_src(src)
    B, T, D = src.shape
    K = _check_idx(idx, B, src.device)
    out = _output(out, (B, K, D), src)
    args = (src.data_ptr(), idx.data_ptr(), out.data_ptr(), B, T, K, D, dtype)
    if src.device.type == "cpu":
        extension().mask_tokens_cpu(*args)
    else:
        _launch_cuda(_cuda_module(src.device).mask_tokens_cuda, "mask_tokens", src.device, *args)
    return out


def unmask_tokens(
    src: torch.Tensor,
    idx: torch.Tensor,
    T: int,
    fill: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """(B, K, D), (B, K) int64 -> (B, T, D): out[b, idx[b, k]] = src[b, k], `fill` elsewhere.

    `fill` holds D elements (shape (D,), (1, D) or (1, 1, D), src's dtype), zeros when None.
    Indices must be unique within a row. On the CPU an out-of-range or repeated index raises
    ValueError before anything is written; on CUDA an out-of-range index is dropped (set
    MICRODIT_CHECK_INDICES=1 to raise instead) and which of repeated indices wins is unspecified.
    """
    dtype = _check_src(src)
    B, K, D = src.shape
    if _check_idx(idx, B, src.device) != K:
        _fail("idx", f"shape (B={B}, K={K}) to match src", f"shape {tuple(idx.shape)}")
    T = _check_num_tokens(T, K)
    fill_ptr = 0
    if fill is not None:
        if not isinstance(fill, torch.Tensor) or fill.numel() != D or fill.shape[-1:] != (D,):
            got = f"shape {tuple(fill.shape)}" if isinstance(fill, torch.Tensor) else type(fill).__name__
            _fail("fill", f"a tensor of D = {D} elements, shape (D,), (1, D) or (1, 1, D)", got)
        _check_tensor("fill", fill, fill.dim(), src.device)
        if fill.dtype != src.dtype:
            _fail("fill", f"dtype {src.dtype} (that of src; cast it with .to(src.dtype))", fill.dtype)
        fill_ptr = fill.data_ptr()
    out = _output(out, (B, T, D), src)
    args = (src.data_ptr(), idx.data_ptr(), out.data_ptr(), fill_ptr, B, T, K, D, dtype)
    if src.device.type == "cpu":
        extension().unmask_tokens_cpu(*args)
    else:
        _launch_cuda(_cuda_module(src.device).unmask_tokens_cuda, "unmask_tokens", src.device, *args)
    return out


# ---------------------------------------------------------------- expert-choice MoE
# Layouts: tokens (B, T, D); idx (B, E, K) int64; weight (B, E, K) in the tokens' dtype;
# blocks (E, B, K, D) expert-major; inv (B, T, E) int32 (slot or -1). See csrc/moe/.
def _check_moe_idx(idx, device: torch.device) -> tuple[int, int, int]:
    _check_tensor("idx", idx, 3, device)
    if idx.dtype != torch.int64:
        _fail("idx", "dtype torch.int64 (call .long())", idx.dtype)
    return tuple(idx.shape)


def _check_same(name: str, t, shape: tuple[int, ...], ref: torch.Tensor) -> None:
    _check_tensor(name, t, len(shape), ref.device)
    if tuple(t.shape) != shape or t.dtype != ref.dtype:
        _fail(name, f"shape {shape} and dtype {ref.dtype}", f"shape {tuple(t.shape)} and dtype {t.dtype}")


def _check_float(name: str, t, ndim: int) -> int:
    _check_tensor(name, t, ndim)
    if t.dtype not in DTYPE_CODES:
        _fail(name, f"dtype {_DTYPE_NAMES}", t.dtype)
    return DTYPE_CODES[t.dtype]


def _run(name: str, device: torch.device, *args) -> None:
    if device.type == "cpu":
        getattr(extension(), name + "_cpu")(*args)
    else:
        with torch.cuda.device(device):
            stream = torch.cuda.current_stream(device).cuda_stream
            getattr(_cuda_module(device), name + "_cuda")(*args, stream)


def moe_inverse(idx: torch.Tensor, T: int) -> torch.Tensor:
    """(B, E, K) int64 -> (B, T, E) int32: inv[b, t, e] = j where idx[b, e, j] == t, else -1.

    On the CPU an index out of range or chosen twice by one expert raises ValueError; on CUDA an
    out-of-range index is dropped (MICRODIT_CHECK_INDICES=1 raises instead, with a sync).
    """
    B, E, K = _check_moe_idx(idx, idx.device)
    T = _check_num_tokens(T, K)
    inv = torch.empty(B, T, E, dtype=torch.int32, device=idx.device)
    if idx.device.type == "cpu":
        extension().moe_inverse_cpu(idx.data_ptr(), inv.data_ptr(), B, T, E, K)
    else:
        _launch_cuda(_cuda_module(idx.device).moe_inverse_cuda, "moe_inverse", idx.device,
                     idx.data_ptr(), inv.data_ptr(), B, T, E, K)
    return inv


def moe_dispatch(tokens: torch.Tensor, idx: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """(B, T, D), (B, E, K) -> (E, B, K, D): blocks[e, b, j] = weight[b, e, j] * tokens[b, idx[b, e, j]]."""
    dtype = _check_float("tokens", tokens, 3)
    B, T, D = tokens.shape
    if _check_moe_idx(idx, tokens.device)[0] != B:
        _fail("idx", f"shape (B={B}, E, K) to match tokens", f"shape {tuple(idx.shape)}")
    _, E, K = idx.shape
    if weight is not None:
        _check_same("weight", weight, (B, E, K), tokens)
    blocks = torch.empty(E, B, K, D, dtype=tokens.dtype, device=tokens.device)
    _run("moe_dispatch", tokens.device, tokens.data_ptr(), idx.data_ptr(),
         0 if weight is None else weight.data_ptr(), blocks.data_ptr(), B, T, E, K, D, dtype)
    return blocks


def moe_combine_backward(grad: torch.Tensor, blocks: torch.Tensor, idx: torch.Tensor, weight: torch.Tensor,
                   need_dblocks: bool = True, need_dweight: bool = True):
    """The combine's backward: (dblocks (E, B, K, D) or None, dweight (B, E, K) or None) with
    g = grad[b, idx[b, e, j]]: dblocks[e, b, j] = weight[b, e, j] * g, dweight[b, e, j] = <g, blocks[e, b, j]>."""
    dtype = _check_float("grad", grad, 3)
    B, T, D = grad.shape
    if _check_moe_idx(idx, grad.device)[0] != B:
        _fail("idx", f"shape (B={B}, E, K) to match grad", f"shape {tuple(idx.shape)}")
    _, E, K = idx.shape
    _check_same("blocks", blocks, (E, B, K, D), grad)
    _check_same("weight", weight, (B, E, K), grad)
    dblocks = torch.empty_like(blocks) if need_dblocks else None
    dweight = torch.empty_like(weight) if need_dweight else None
    _run("moe_combine_backward", grad.device, grad.data_ptr(), blocks.data_ptr(), idx.data_ptr(),
         weight.data_ptr(), 0 if dblocks is None else dblocks.data_ptr(),
         0 if dweight is None else dweight.data_ptr(), B, T, E, K, D, dtype)
    return dblocks, dweight


def moe_combine(blocks: torch.Tensor, inv: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """(E, B, K, D), inv (B, T, E) int32 -> (B, T, D): the weighted sum of each token's expert rows,
    added in expert order (deterministic); tokens no expert chose are zero."""
    dtype = _check_float("blocks", blocks, 4)
    E, B, K, D = blocks.shape
    _check_tensor("inv", inv, 3, blocks.device)
    if inv.dtype != torch.int32 or inv.shape[0] != B or inv.shape[2] != E:
        _fail("inv", f"an int32 tensor of shape (B={B}, T, E={E})", f"{inv.dtype} of shape {tuple(inv.shape)}")
    T = inv.shape[1]
    if K > T:
        _fail("blocks", f"at most T = {T} slots per expert", f"K = {K}")
    if weight is not None:
        _check_same("weight", weight, (B, E, K), blocks)
    out = torch.empty(B, T, D, dtype=blocks.dtype, device=blocks.device)
    _run("moe_combine", blocks.device, blocks.data_ptr(), inv.data_ptr(),
         0 if weight is None else weight.data_ptr(), out.data_ptr(), B, T, E, K, D, dtype)
    return out


def moe_gelu_(h: torch.Tensor) -> torch.Tensor:
    """In place h = gelu(h) (exact, erf); returns gelu'(h) of the input, same shape and dtype."""
    dtype = DTYPE_CODES.get(h.dtype)
    if dtype is None:
        _fail("h", f"dtype {_DTYPE_NAMES}", h.dtype)
    _check_tensor("h", h, h.dim())
    d = torch.empty_like(h)
    _run("moe_gelu", h.device, h.data_ptr(), d.data_ptr(), h.numel(), dtype)
    return d


def supports(device_type: str):
    """A registry `supports` check for the extension's backends: the device, and a known dtype."""
    def check(x, *args, **kwargs) -> list[str]:
        reasons = []
        if x.device.type != device_type:
            reasons.append(f"tensor on {x.device.type}, this backend runs on {device_type}")
        if x.dtype not in DTYPE_CODES:
            reasons.append(f"dtype {x.dtype} not supported (supported: fp32, fp16, bf16, fp64)")
        return reasons
    return check


# ---------------------------------------------------------------- cuBLASLt expert GEMMs
# The `cublaslt` MoE backend's two GEMMs with the GELU (tanh form) in the epilogue; see
# csrc/moe/moe_cublaslt.h. cuBLASLt is opened by the extension at first use, not linked.
LT_DTYPES = (torch.float16, torch.bfloat16)
# cuBLASLt's workspace: what it recommends on Hopper (32 MiB), 4 MiB before.
_LT_WORKSPACE = {9: 32 << 20}


def cublaslt_reasons() -> list[str]:
    """Why the extension cannot run cuBLASLt here: no extension, or libcublasLt not loadable."""
    ext = extension()
    if not ext:
        return [repr(ext)]
    error = ext.cublaslt_load_error()
    return [error] if error else []


def _alignment(*tensors: torch.Tensor) -> int:
    """The largest power of two <= 256 dividing every tensor's address, in bytes."""
    align = 256
    for t in tensors:
        while t.data_ptr() % align:
            align //= 2
    return align


def _check_lt(name: str, t, shape: tuple[int, ...], ref: torch.Tensor) -> None:
    _check_tensor(name, t, 3, ref.device)
    if tuple(t.shape) != shape or t.dtype != ref.dtype:
        _fail(name, f"shape {shape} and dtype {ref.dtype}", f"shape {tuple(t.shape)} and dtype {t.dtype}")


def _lt_call(fn_name: str, ref: torch.Tensor, ptrs: tuple[int, ...], sizes: tuple[int, ...], align: int) -> None:
    device = ref.device
    if device.type != "cuda":
        _fail("x", "a CUDA tensor (cuBLASLt runs on the GPU)", device)
    reasons = cublaslt_reasons()
    if reasons:
        raise RuntimeError(f"{fn_name}: cannot run: " + "; ".join(reasons))
    with torch.cuda.device(device):
        major = torch.cuda.get_device_capability(device)[0]
        ws_bytes = _LT_WORKSPACE.get(major, 4 << 20)
        workspace = torch.empty(ws_bytes, dtype=torch.uint8, device=device)
        stream = torch.cuda.current_stream(device).cuda_stream
        getattr(extension(), fn_name)(*ptrs, *sizes, DTYPE_CODES[ref.dtype], torch.cuda.current_device(), align,
                                      workspace.data_ptr(), ws_bytes, stream)


def _check_lt_dtype(name: str, t: torch.Tensor) -> None:
    if t.dtype not in LT_DTYPES:
        _fail(name, "dtype float16 or bfloat16 (cuBLASLt's GELU epilogue is the tanh form, exact only to "
                    "their rounding)", t.dtype)


def moe_gemm_gelu_aux(x: torch.Tensor, w1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (E, M, K), w1 (E, K, N) -> (gelu_tanh(x @ w1), x @ w1), both (E, M, N): one cuBLASLt GEMM
    with the GELU in its epilogue, which also writes the pre-activation for the backward."""
    _check_tensor("x", x, 3)
    _check_lt_dtype("x", x)
    E, M, K = x.shape
    _check_tensor("w1", w1, 3, x.device)
    if w1.dtype != x.dtype or w1.shape[:2] != (E, K):
        _fail("w1", f"shape (E={E}, K={K}, N) and dtype {x.dtype}", f"shape {tuple(w1.shape)} and dtype {w1.dtype}")
    N = w1.shape[2]
    out = torch.empty(E, M, N, dtype=x.dtype, device=x.device)
    aux = torch.empty_like(out)
    _lt_call("moe_gemm_gelu_aux_lt", x, (x.data_ptr(), w1.data_ptr(), out.data_ptr(), aux.data_ptr()),
             (E, M, K, N), _alignment(x, w1, out, aux))
    return out, aux


def moe_gemm_dgelu(dy: torch.Tensor, w2: torch.Tensor, aux: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """dy (E, M, K), w2 (E, N, K), aux (E, M, N) -> (dy @ w2^T) * gelu_tanh'(aux), (E, M, N), in
    `out` when given (it may be a buffer no other argument shares): the GELU's backward in the
    GEMM's epilogue."""
    _check_tensor("dy", dy, 3)
    _check_lt_dtype("dy", dy)
    E, M, K = dy.shape
    _check_tensor("w2", w2, 3, dy.device)
    if w2.dtype != dy.dtype or w2.shape[0] != E or w2.shape[2] != K:
        _fail("w2", f"shape (E={E}, N, K={K}) and dtype {dy.dtype}", f"shape {tuple(w2.shape)} and dtype {w2.dtype}")
    N = w2.shape[1]
    _check_lt("aux", aux, (E, M, N), dy)
    if out is None:
        out = torch.empty(E, M, N, dtype=dy.dtype, device=dy.device)
    else:
        _check_lt("out", out, (E, M, N), dy)
        shared = [n for n, t in (("dy", dy), ("w2", w2), ("aux", aux))
                  if t.untyped_storage().data_ptr() == out.untyped_storage().data_ptr()]
        if shared:
            _fail("out", "a buffer of its own", f"one that shares memory with {', '.join(shared)}")
    _lt_call("moe_gemm_dgelu_lt", dy, (dy.data_ptr(), w2.data_ptr(), aux.data_ptr(), out.data_ptr()),
             (E, M, K, N), _alignment(dy, w2, aux, out))
    return out
