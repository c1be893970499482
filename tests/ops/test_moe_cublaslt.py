"""The `cublaslt` MoE backend: the expert GEMMs with the GELU (tanh form) in cuBLASLt epilogues.

On the CPU: the tanh GELU against the published one (the bound the backend's dtype rule rests
on), the layer's autograd built around the two epilogue ops (run through their torch emulation)
against the definition, the custom ops, compile, the registry's reasons, the loader's errors and
the extension's argument checks. On a GPU (`gpu`-marked): cuBLASLt against the emulation.
"""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from microdit import _ext
from microdit.availability import extension
from microdit.ops import moe
from microdit.ops.registry import BackendError
from tests.ops.test_moe import dense_moe, inputs

EXT = bool(extension())
needs_ext = pytest.mark.skipif(not EXT, reason="compiled extension not available here")


def dense_moe_tanh(x, gate, w1, w2, capacity):
    """The layer's definition token by token, with the tanh GELU of cuBLASLt's epilogue."""
    return dense_moe(x, gate, w1, w2, capacity, gelu=lambda h: F.gelu(h, approximate="tanh"))


def test_tanh_gelu_error_bound_is_tight():
    """max |gelu_tanh - gelu| is 4.73e-4, at |x| = 2.70; TANH_GELU_MAX_ERROR bounds it closely."""
    x = torch.linspace(-10, 10, 2_000_001, dtype=torch.float64)
    err = (F.gelu(x, approximate="tanh") - F.gelu(x)).abs()
    assert 4.7e-4 < err.max().item() <= moe.TANH_GELU_MAX_ERROR < 4.9e-4
    assert abs(abs(x[err.argmax()].item()) - 2.70) < 0.01
    # Small next to bf16's rounding of activations of the size where it peaks (x ~ 2.7) ...
    half_ulp = 2.0**-7  # bf16 in [2, 4): 7 stored mantissa bits, ulp 2^-6
    assert 2 < F.gelu(torch.tensor(2.7)).item() < 4 and err.max() < half_ulp / 10
    # ... but not one rounding of every output: at x = -2.7 the small output is 5% off.
    neg = torch.tensor(-2.7, dtype=torch.float64)
    assert (F.gelu(neg, approximate="tanh") - F.gelu(neg)).abs() / F.gelu(neg).abs() > 0.04


@needs_ext
@pytest.mark.parametrize("shape", [(2, 16, 32, 64, 4, 2.0), (3, 123, 77, 96, 5, 1.5)], ids=str)
def test_epilogue_layer_matches_its_definition_fp64(shape):
    """Forward saves the pre-activation, backward applies the derivative from it: every gradient
    equals autograd through the definition (float64, the ops' CPU emulation)."""
    *dims, cap = shape
    args = inputs(*dims)
    out = moe.moe_ext_epilogue(*args, cap)
    ref = dense_moe_tanh(*args, cap)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    go = torch.randn_like(out)
    for name, a, b in zip(("x", "gate", "w1", "w2"), torch.autograd.grad(out, args, go), torch.autograd.grad(ref, args, go)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11, msg=f"grad {name}")


@needs_ext
def test_epilogue_layer_differs_from_the_published_gelu_in_float64():
    """The test above is not vacuous: in float64 the tanh form is visibly not the published layer."""
    args = inputs(2, 16, 32, 64, 4)
    gap = (moe.moe_ext_epilogue(*args, 2.0) - moe.expert_choice_moe(*args, 2.0, backend="reference")).abs().max()
    assert 1e-6 < gap < 10 * moe.TANH_GELU_MAX_ERROR


@needs_ext
def test_epilogue_layer_in_bf16_is_as_close_to_the_published_layer_as_bf16_itself():
    """|out - ref64| <= 2 |ref_bf16 - ref64| + floor, for outputs and gradients, as the other backends."""
    B, T, d, h, E, cap = 2, 64, 48, 128, 8, 2.0
    args64 = inputs(B, T, d, h, E)
    argsl = [a.detach().bfloat16().requires_grad_() for a in args64]
    ref64 = moe.expert_choice_moe(*args64, cap, backend="reference")
    refl = moe.expert_choice_moe(*argsl, cap, backend="reference")
    out = moe.moe_ext_epilogue(*argsl, cap)
    assert out.dtype == torch.bfloat16
    assert ((out.double() - ref64).abs() <= 2 * (refl.double() - ref64).abs() + 1e-2).float().mean() > 0.99
    go = torch.randn_like(ref64)
    g64 = torch.autograd.grad(ref64, args64, go)
    gl = torch.autograd.grad(refl, argsl, go.bfloat16())
    go_ = torch.autograd.grad(out, argsl, go.bfloat16())
    for name, a, b, c in zip(("x", "gate", "w1", "w2"), go_, gl, g64):
        err, ref_err = (a.double() - c).norm(), (b.double() - c).norm()
        assert err <= 2 * ref_err + 1e-2 * c.norm(), f"grad {name}: {err} vs bf16 reference's own {ref_err}"


@needs_ext
def test_epilogue_ops_opcheck_and_compile():
    g = torch.Generator().manual_seed(0)
    x, w1 = torch.randn(3, 10, 16, generator=g), torch.randn(3, 16, 24, generator=g)
    dy, w2 = torch.randn(3, 10, 16, generator=g), torch.randn(3, 24, 16, generator=g)
    torch.library.opcheck(moe.moe_gemm_gelu_aux_ext, (x, w1))
    act, pre = moe.moe_gemm_gelu_aux_ext(x, w1)
    torch.testing.assert_close(pre, x @ w1)
    torch.testing.assert_close(act, F.gelu(x @ w1, approximate="tanh"))
    torch.library.opcheck(moe.moe_gemm_dgelu_ext_, (dy, w2, pre, torch.empty_like(pre)))
    out = torch.empty_like(pre)
    moe.moe_gemm_dgelu_ext_(dy, w2, pre, out)
    torch.testing.assert_close(out, torch.ops.aten.gelu_backward(dy @ w2.transpose(1, 2), pre, approximate="tanh"))

    args = [a.detach().float().requires_grad_() for a in inputs(2, 16, 32, 64, 4)]
    f = lambda *a: moe.moe_ext_epilogue(*a, 2.0)
    out = f(*args)
    go = torch.randn_like(out)
    expected = torch.autograd.grad(out, args, go)
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    out_c = compiled(*args)
    torch.testing.assert_close(out_c, out)
    for a, b in zip(torch.autograd.grad(out_c, args, go), expected):
        torch.testing.assert_close(a, b)


def test_registry_says_why_cublaslt_cannot_run_and_never_picks_it_unasked():
    assert "cublaslt" in moe.moe_op.impls
    assert moe.moe_op.impls["cublaslt"].priority < moe.moe_op.impls["cuda"].priority
    x, gate, w1, w2 = inputs(2, 16, 32, 64, 4, dtype=torch.float32)
    reasons = moe.moe_op.impls["cublaslt"].supports(x, gate, w1, w2, 2.0)
    assert any("tanh form" in r for r in reasons) and any("runs on cuda" in r for r in reasons)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not any("tanh" in r for r in moe.moe_op.impls["cublaslt"].supports(x, gate, w1, w2, 2.0))
    odd = moe.moe_op.impls["cublaslt"].supports(x, gate, w1[..., :60], w2[:, :60], 2.0)
    assert any("multiple of 8" in r for r in odd)
    if not torch.cuda.is_available():
        assert moe.moe_op.reasons("cublaslt")
        with pytest.raises(BackendError, match="cublaslt"):
            moe.expert_choice_moe(x, gate, w1, w2, 2.0, backend="cublaslt")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert moe.moe_op.pick(None, x, gate, w1, w2, 2.0).name != "cublaslt"


@needs_ext
def test_ext_wrappers_refuse_bad_inputs_before_calling_cublaslt():
    x, w1 = torch.randn(2, 8, 16).bfloat16(), torch.randn(2, 16, 24).bfloat16()
    with pytest.raises(ValueError, match="CUDA tensor"):
        _ext.moe_gemm_gelu_aux(x, w1)
    with pytest.raises(ValueError, match="float16 or bfloat16"):
        _ext.moe_gemm_gelu_aux(x.float(), w1.float())
    with pytest.raises(ValueError, match="w1"):
        _ext.moe_gemm_gelu_aux(x, w1[:, :8])
    aux = torch.empty(2, 8, 24).bfloat16()
    with pytest.raises(ValueError, match="aux"):
        _ext.moe_gemm_dgelu(x, w1.transpose(1, 2).contiguous(), aux[:, :4])
    with pytest.raises(ValueError, match="shares memory with aux"):
        _ext.moe_gemm_dgelu(x, w1.transpose(1, 2).contiguous(), aux, out=aux)


@needs_ext
def test_extension_checks_its_arguments_before_opening_cublaslt():
    C = extension()
    args = dict(x=1 << 12, w1=1 << 12, out=1 << 12, aux=1 << 12, E=2, M=16, K=8, N=8, dtype=2, device=0,
                align=16, workspace=0, workspace_bytes=0, stream=0)
    with pytest.raises(ValueError, match="float16 or 2=bfloat16"):
        C.moe_gemm_gelu_aux_lt(**{**args, "dtype": 0})
    with pytest.raises(ValueError, match="multiple of 8"):
        C.moe_gemm_gelu_aux_lt(**{**args, "N": 12})
    with pytest.raises(ValueError, match="power of two"):
        C.moe_gemm_gelu_aux_lt(**{**args, "align": 12})
    with pytest.raises(ValueError, match="null pointer"):
        C.moe_gemm_dgelu_lt(**{"dy": 0, "w2": 1 << 12, "aux": 1 << 12, "out": 1 << 12,
                               **{k: v for k, v in args.items() if k not in ("x", "w1", "out", "aux")}})


def _load_error(env_value: str) -> str:
    code = "import microdit._C as C; print(C.cublaslt_load_error()); print(C.cublaslt_version())"
    env = {**os.environ, "MICRODIT_CUBLASLT": env_value}
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    return run.stdout


@needs_ext
def test_loader_names_the_library_it_could_not_open_or_use():
    out = _load_error("/nonexistent/libcublasLt.so.99")
    assert "libcublasLt not found" in out and "/nonexistent/libcublasLt.so.99" in out and "MICRODIT_CUBLASLT" in out
    assert out.splitlines()[-1] == "0"
    # A library that opens but is not cuBLASLt: every missing function is named.
    out = _load_error("libm.so.6")
    assert "libcublasLt lacks cublasLtCreate" in out and "cublasLtMatmul" in out


# ---------------------------------------------------------------- on a GPU
def skip_unless_cublaslt_runs():
    reasons = moe.moe_op.reasons("cublaslt")
    if reasons:
        pytest.skip("; ".join(reasons))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("E, M, K, N", [(8, 512, 256, 1024), (1, 37, 64, 96), (3, 130, 40, 24)])
@pytest.mark.parametrize("offset", [0, 8], ids=["aligned", "offset16B"])
def test_cublaslt_epilogues_match_their_emulation(E, M, K, N, dtype, offset):
    """cuBLASLt's GELU_AUX and DGELU GEMMs against torch in float32 with the same tanh GELU:
    within a rounding of the output dtype (accumulation order differs)."""
    skip_unless_cublaslt_runs()
    g = torch.Generator("cuda").manual_seed(0)
    mk = lambda *s, sc: (torch.randn(s[0] * s[1] * s[2] + offset, generator=g, device="cuda")[offset:] * sc).to(dtype).view(*s)
    x, w1 = mk(E, M, K, sc=1.0), mk(E, K, N, sc=2 * K**-0.5)
    dy, w2 = mk(E, M, K, sc=1.0), mk(E, N, K, sc=N**-0.5)
    act, pre = _ext.moe_gemm_gelu_aux(x, w1)
    act_e, pre_e = moe.gemm_gelu_aux_emulated(x, w1)
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(pre, pre_e, **tol)
    torch.testing.assert_close(act, act_e, **tol)
    dh = _ext.moe_gemm_dgelu(dy, w2, pre)
    torch.testing.assert_close(dh, moe.gemm_dgelu_emulated(dy, w2, pre), **tol)


@pytest.mark.gpu
def test_cublaslt_backend_trains_like_the_exact_cuda_backend():
    """Under bf16 autocast the layer and its gradients are as close to the `cuda` backend's as
    bf16 allows, on an XL-like block shape."""
    skip_unless_cublaslt_runs()
    args = [a.detach().float().requires_grad_() for a in inputs(8, 64, 256, 1024, 8, device="cuda")]
    go = torch.randn(8, 64, 256, device="cuda")
    results = {}
    for backend in ("cuda", "cublaslt"):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = moe.expert_choice_moe(*args, 2.0, backend=backend)
        results[backend] = (out.float(), *torch.autograd.grad(out.float(), args, go))
    for name, a, b in zip(("out", "x", "gate", "w1", "w2"), results["cublaslt"], results["cuda"]):
        assert (a - b).norm() <= 2e-2 * b.norm(), f"{name}: relative difference {((a - b).norm() / b.norm()).item():.3g}"


def _cublaslt_header_dirs() -> list[str]:
    """Where a cublasLt.h may be: $CUBLASLT_INCLUDE, the CUDA toolkit, a CUDA torch's nvidia-cublas."""
    import glob
    import sysconfig
    dirs = [os.environ.get("CUBLASLT_INCLUDE", ""), "/usr/local/cuda/include"]
    dirs += glob.glob(os.path.join(sysconfig.get_paths()["purelib"], "nvidia", "*", "include"))
    return [d for d in dirs if d and os.path.isfile(os.path.join(d, "cublasLt.h"))]


def test_cublaslt_abi_constants_match_the_real_header(tmp_path):
    """csrc/moe/moe_cublaslt.cpp declares the cuBLASLt values it uses; where a real cublasLt.h is
    found it static_asserts them against it (checked by hand against CUDA 13.1's header)."""
    import shutil
    from pathlib import Path
    dirs = _cublaslt_header_dirs()
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if not dirs or cxx is None:
        pytest.skip("no cublasLt.h here (set CUBLASLT_INCLUDE to a folder holding it) or no C++ compiler")
    root = Path(__file__).resolve().parents[2]
    cuda_inc = [f"-I{d}" for d in ("/usr/local/cuda/include",) if os.path.isdir(d)]
    cmd = [cxx, "-std=c++17", "-fsyntax-only", "-dM", "-E", f"-I{root / 'csrc'}", f"-I{dirs[0]}", *cuda_inc,
           str(root / "csrc" / "moe" / "moe_cublaslt.cpp")]
    macros = subprocess.run(cmd, capture_output=True, text=True)
    assert "MICRODIT_HAVE_CUBLASLT_H" in macros.stdout, macros.stderr[-2000:]
    check = subprocess.run([c for c in cmd if c not in ("-dM", "-E")], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr[-4000:]
