"""The compiled extension microdit._C: build, CPU kernels against torch, errors, CUDA build."""
from __future__ import annotations

import os
import re
import runpy
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from microdit import _ext
from microdit.availability import extension

ROOT = Path(__file__).resolve().parents[1]
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
# Same-width integer views, so that comparisons are bitwise (NaN payloads and -0.0 included).
BITS = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16,
        torch.float64: torch.int64}
# (B, T, K, D): odd sizes; rows a multiple of 16 bytes; enough bytes for the OpenMP path; edges.
SHAPES = [(3, 123, 31, 77), (2, 64, 16, 64), (4, 256, 128, 256), (1, 1, 1, 1), (2, 9, 9, 5),
          (2, 7, 0, 3)]


# Where setup.py finds nvcc (PATH, $CUDA_HOME/bin, /usr/local/cuda/bin): its own function.
find_nvcc = runpy.run_path(str(ROOT / "setup.py"), run_name="microdit_setup")["find_nvcc"]


def ext_cuda_built() -> bool:
    ext = extension()
    return bool(ext) and ext.build_info()["cuda"]


def make_inputs(B, T, K, D, dtype, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    src = torch.randn(B, T, D, generator=g).to(dtype)
    if src.numel() >= 2:
        src.view(-1)[:2] = torch.tensor([float("nan"), -0.0], dtype=dtype)
    idx = torch.stack([torch.randperm(T, generator=g)[:K] for _ in range(B)]).reshape(B, K)
    fill = torch.randn(D, generator=g).to(dtype)
    return src.to(device), idx.to(device), fill.to(device)


def gather_ref(src, idx):
    return src[torch.arange(src.shape[0], device=src.device)[:, None], idx]


def scatter_ref(src, idx, T, fill):
    B, _, D = src.shape
    out = src.new_zeros(B, T, D) if fill is None else fill.reshape(D).expand(B, T, D).clone()
    out[torch.arange(B, device=src.device)[:, None], idx] = src
    return out


def assert_bitwise_equal(out, ref):
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert torch.equal(out.view(BITS[out.dtype]), ref.view(BITS[ref.dtype]))


# ------------------------------------------------------------------ build
def test_extension_importable():
    ext = extension()
    assert ext, f"microdit._C did not import: {ext!r}"
    import microdit._C  # noqa: F401  the real module, not a stub

    info = ext.build_info()
    assert set(info) == {"cuda", "cuda_archs", "openmp", "version", "compiler"}
    assert isinstance(info["cuda"], bool) and isinstance(info["openmp"], bool)
    assert info["version"] and info["compiler"]
    assert bool(info["cuda_archs"]) == info["cuda"]
    assert hasattr(ext, "mask_tokens_cuda") == info["cuda"]


def test_an_extension_built_from_older_sources_is_reported():
    import types

    from microdit.availability import EXTENSION_ENTRY_POINTS, check_entry_points

    assert check_entry_points(extension()) is extension()
    old = types.SimpleNamespace(**{n: None for n in EXTENSION_ENTRY_POINTS if n != "mask_tokens_cpu"})
    stub = check_entry_points(old)
    assert not stub and "lacks mask_tokens_cpu" in repr(stub) and "build_ext --inplace" in repr(stub)


def test_cuda_built_when_nvcc_present():
    """CI proof that the CUDA sources compile: with nvcc around, the install must include them."""
    nvcc = find_nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found (PATH, $CUDA_HOME/bin, /usr/local/cuda/bin): CPU-only build")
    if os.environ.get("MICRODIT_CUDA", "auto").strip() == "0":
        pytest.skip("MICRODIT_CUDA=0 asks for a CPU-only build")
    info = extension().build_info()
    assert info["cuda"], f"nvcc is at {nvcc} but microdit._C was built without CUDA: {info}"
    assert info["cuda_archs"]


@pytest.mark.slow
def test_cmake_builds_cuda_sources(tmp_path):
    """A fresh CMake configure + build of every source with CUDA on, for sm_80 and sm_90."""
    nvcc = find_nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found (PATH, $CUDA_HOME/bin, /usr/local/cuda/bin)")
    cmake, ninja = shutil.which("cmake"), shutil.which("ninja")
    if cmake is None or ninja is None:
        pytest.skip("cmake or ninja not on PATH (pip install cmake ninja)")
    pybind11 = subprocess.run([sys.executable, "-m", "pybind11", "--cmakedir"],
                              capture_output=True, text=True)
    if pybind11.returncode != 0:
        pytest.skip("pybind11 is not installed in this environment (pip install pybind11)")
    configure = [cmake, "-S", str(ROOT), "-B", str(tmp_path), "-G", "Ninja",
                 f"-DCMAKE_MAKE_PROGRAM={ninja}", f"-DPython_EXECUTABLE={sys.executable}",
                 f"-Dpybind11_DIR={pybind11.stdout.strip()}", "-DMICRODIT_CUDA=ON",
                 f"-DCMAKE_CUDA_COMPILER={nvcc}", "-DMICRODIT_CUDA_ARCHS=80;90"]
    for cmd in (configure, [cmake, "--build", str(tmp_path), "-j", str(os.cpu_count() or 1)]):
        run = subprocess.run(cmd, capture_output=True, text=True)
        assert run.returncode == 0, f"{' '.join(cmd)} failed:\n{run.stdout[-4000:]}\n{run.stderr[-4000:]}"
    (module,) = tmp_path.glob("_C*.so")
    binary = module.read_bytes()
    assert b"sm_80" in binary and b"sm_90" in binary, "device code for sm_80 and sm_90 expected"


def test_half_conversions_match_torch(tmp_path):
    """csrc/common.h's fp16/bf16 <-> float conversions, bit for bit against torch."""
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if cxx is None:
        pytest.skip("no C++ compiler on PATH")
    program = tmp_path / "convert.cpp"
    program.write_text(r"""
        #include <cstdio>
        #include <vector>
        #include "common.h"
        using namespace microdit;
        int main() {  // stdin: n floats; stdout: 65536 fp16->float, 65536 bf16->float, n fp16, n bf16
          std::vector<float> in;
          float f;
          while (std::fread(&f, sizeof f, 1, stdin) == 1) in.push_back(f);
          for (unsigned b = 0; b < 65536; ++b) { f = to_float(Half{std::uint16_t(b)}); std::fwrite(&f, 4, 1, stdout); }
          for (unsigned b = 0; b < 65536; ++b) { f = to_float(BFloat16{std::uint16_t(b)}); std::fwrite(&f, 4, 1, stdout); }
          for (float x : in) { std::uint16_t h = to_half(x).bits; std::fwrite(&h, 2, 1, stdout); }
          for (float x : in) { std::uint16_t h = to_bfloat16(x).bits; std::fwrite(&h, 2, 1, stdout); }
        }
    """)
    exe = tmp_path / "convert"
    subprocess.run([cxx, "-std=c++17", "-O2", f"-I{ROOT / 'csrc'}", str(program), "-o", str(exe)],
                   check=True)
    g = torch.Generator().manual_seed(0)
    specials = torch.tensor([0.0, -0.0, 1.0, 65504.0, 65519.99, 65520.0, 1e6, float("inf"),
                             -float("inf"), float("nan"), 6.1035156e-05, 5.96e-08, 2.98e-08,
                             2.9802322e-08, 1e-45, 3.0e-38, 3.4e38, 1.00048828125, 1.0009765625])
    floats = torch.cat([specials, -specials, torch.randn(100_000, generator=g) * 10.0 ** torch.randint(-9, 7, (100_000,), generator=g),
                        torch.randint(0, 2**32, (100_000,), generator=g, dtype=torch.int64).to(torch.int32).view(torch.float32)])
    result = subprocess.run([str(exe)], input=floats.numpy().tobytes(), capture_output=True, check=True).stdout
    out = torch.frombuffer(bytearray(result), dtype=torch.uint8)
    n = floats.numel()
    half_to_f, bf_to_f, f_to_half, f_to_bf = out.split([65536 * 4, 65536 * 4, n * 2, n * 2])
    all16 = torch.arange(65536, dtype=torch.int32).to(torch.int16)

    def same(got, want):  # bitwise, except that any NaN matches any NaN
        nan = want.isnan()
        return torch.equal(got.isnan(), nan) and torch.equal(got[~nan].view(BITS[got.dtype]), want[~nan].view(BITS[want.dtype]))

    assert same(half_to_f.view(torch.float32), all16.view(torch.float16).float())
    assert same(bf_to_f.view(torch.float32), all16.view(torch.bfloat16).float())
    assert same(f_to_half.view(torch.float16), floats.to(torch.float16))
    assert same(f_to_bf.view(torch.bfloat16), floats.to(torch.bfloat16))


# ------------------------------------------------------------------ CPU kernels
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}_T{}_K{}_D{}".format(*s))
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_gather_cpu(shape, dtype):
    B, T, K, D = shape
    src, idx, _ = make_inputs(B, T, K, D, dtype)
    assert_bitwise_equal(_ext.mask_tokens(src, idx), gather_ref(src, idx))


@pytest.mark.parametrize("fill_shape", [None, "D", "11D"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}_T{}_K{}_D{}".format(*s))
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_scatter_cpu(shape, dtype, fill_shape):
    B, T, K, D = shape
    full, idx, fill = make_inputs(B, T, K, D, dtype)
    src = gather_ref(full, idx).contiguous()
    if fill_shape == "11D":
        fill = fill.reshape(1, 1, D)
    elif fill_shape is None:
        fill = None
    assert_bitwise_equal(_ext.unmask_tokens(src, idx, T, fill), scatter_ref(src, idx, T, fill))


def test_scatter_inverts_gather_cpu():
    src, idx, _ = make_inputs(2, 50, 50, 33, torch.bfloat16)  # K == T: a permutation
    assert_bitwise_equal(_ext.unmask_tokens(_ext.mask_tokens(src, idx), idx, 50), src)


def test_gather_indices_may_repeat_cpu():
    src, _, _ = make_inputs(2, 10, 0, 6, torch.float32)
    idx = torch.tensor([[3, 3, 0, 9, 9, 9, 1, 2, 2, 5, 5, 5]] * 2)  # K > T is fine for gather
    assert_bitwise_equal(_ext.mask_tokens(src, idx), gather_ref(src, idx))


def test_out_argument_cpu():
    src, idx, fill = make_inputs(3, 40, 11, 13, torch.float16)
    out = torch.empty(3, 11, 13, dtype=torch.float16)
    assert _ext.mask_tokens(src, idx, out=out) is out
    assert_bitwise_equal(out, gather_ref(src, idx))
    out2 = torch.full((3, 40, 13), 7.0, dtype=torch.float16)
    assert _ext.unmask_tokens(out, idx, 40, fill, out=out2) is out2
    assert_bitwise_equal(out2, scatter_ref(out, idx, 40, fill))


# ------------------------------------------------------------------ errors
@pytest.mark.parametrize("bad", [123, 1000, -1])
def test_gather_out_of_range_raises_before_writing(bad):
    src, idx, _ = make_inputs(3, 123, 31, 77, torch.float32)
    idx[1, 5] = bad
    out = torch.full((3, 31, 77), 42.0)
    with pytest.raises(ValueError, match=rf"idx\[1, 5\] = {bad} is out of range for T = 123"):
        _ext.mask_tokens(src, idx, out=out)
    assert bool((out == 42.0).all()), "nothing may be written when an index is invalid"


def test_scatter_bad_indices_raise_before_writing():
    full, idx, fill = make_inputs(2, 30, 10, 8, torch.float32)
    src = gather_ref(full, idx).contiguous()
    out = torch.full((2, 30, 8), 42.0)
    bad = idx.clone()
    bad[1, 3] = 30
    with pytest.raises(ValueError, match=r"idx\[1, 3\] = 30 is out of range"):
        _ext.unmask_tokens(src, bad, 30, fill, out=out)
    bad = idx.clone()
    bad[0, 7] = bad[0, 2]
    with pytest.raises(ValueError, match=rf"idx\[0\] repeats token {int(bad[0, 2])} \(at k = 2 and k = 7\)"):
        _ext.unmask_tokens(src, bad, 30, fill, out=out)
    assert bool((out == 42.0).all()), "nothing may be written when an index is invalid"


def test_wrong_arguments_name_the_argument():
    src, idx, fill = make_inputs(3, 20, 5, 8, torch.float32)
    kept = gather_ref(src, idx).contiguous()
    cases = [
        (lambda: _ext.mask_tokens(src[0], idx), r"src: expected a 3-d tensor, got shape \(20, 8\)"),
        (lambda: _ext.mask_tokens(src.int(), idx), r"src: expected dtype float32, float16, bfloat16, float64, got torch.int32"),
        (lambda: _ext.mask_tokens(src.transpose(1, 2), idx), r"src: expected a contiguous tensor"),
        (lambda: _ext.mask_tokens(src, idx[:2]), r"idx: expected shape \(B=3, K\) to match src, got shape \(2, 5\)"),
        (lambda: _ext.mask_tokens(src, idx.int()), r"idx: expected dtype torch.int64"),
        (lambda: _ext.mask_tokens(src, idx[0]), r"idx: expected a 2-d tensor"),
        (lambda: _ext.mask_tokens(src, idx.to("meta")), r"idx: expected a tensor on cpu"),
        (lambda: _ext.mask_tokens(src, idx, out=torch.empty(3, 5, 9)), r"out: expected shape \(3, 5, 8\)"),
        (lambda: _ext.mask_tokens(src, idx, out=src[:, :5]), r"out: expected a contiguous tensor|out: expected a tensor that does not share memory"),
        (lambda: _ext.unmask_tokens(kept, idx[:, :4].contiguous(), 20), r"idx: expected shape \(B=3, K=5\) to match src, got shape \(3, 4\)"),
        (lambda: _ext.unmask_tokens(kept, idx, 4), r"T: expected an int >= K = 5"),
        (lambda: _ext.unmask_tokens(kept, idx, 20.0), r"T: expected an int"),
        (lambda: _ext.unmask_tokens(kept, idx, 20, fill[:7]), r"fill: expected a tensor of D = 8 elements"),
        (lambda: _ext.unmask_tokens(kept, idx, 20, fill.double()), r"fill: expected dtype torch.float32"),
        (lambda: _ext.unmask_tokens(kept, idx, 20, fill, out=torch.empty(3, 19, 8)), r"out: expected shape \(3, 20, 8\)"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message):
            call()


def test_raw_entry_points_check_their_arguments():
    ext = extension()
    with pytest.raises(ValueError, match=r"unknown dtype code 7"):
        ext.mask_tokens_cpu(0, 0, 0, 1, 1, 1, 1, 7)
    with pytest.raises(ValueError, match=r"sizes must be non-negative"):
        ext.mask_tokens_cpu(0, 0, 0, -1, 1, 1, 1, 0)
    with pytest.raises(ValueError, match=r"idx is a null pointer"):
        ext.mask_tokens_cpu(0, 0, 0, 1, 1, 1, 1, 0)
    with pytest.raises(ValueError, match=r"K = 3 kept tokens cannot exceed T = 2"):
        ext.unmask_tokens_cpu(0, 0, 0, 0, 1, 2, 3, 1, 0)


# ------------------------------------------------------------------ CUDA kernels
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_cuda_matches_reference(dtype, monkeypatch):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device visible to torch")
    if not ext_cuda_built():
        pytest.skip("microdit._C was built without CUDA (nvcc not found at build time, or MICRODIT_CUDA=0)")
    stream = torch.cuda.Stream()  # a non-default stream, to catch launches on the wrong one
    with torch.cuda.stream(stream):
        for B, T, K, D in SHAPES + [(2, 300, 77, 1152), (70_000, 2, 1, 8)]:
            src, idx, fill = make_inputs(B, T, K, D, dtype, device="cuda")
            for offset in (0, 1):  # offset 1 misaligns every row: the narrow-access path
                buf = torch.empty(src.numel() + offset, dtype=dtype, device="cuda")
                s = buf[offset:].view(src.shape)
                s.copy_(src)
                got = _ext.mask_tokens(s, idx)
                assert_bitwise_equal(got, gather_ref(s, idx))
                for f in (None, fill, fill.reshape(1, 1, D)):
                    assert_bitwise_equal(_ext.unmask_tokens(got, idx, T, f), scatter_ref(got, idx, T, f))
        src, idx, fill = make_inputs(3, 123, 31, 77, dtype, device="cuda")
        idx[1, 5] = 123
        gathered = _ext.mask_tokens(src, idx)  # out-of-range: a zero row, nothing out of bounds
        assert not gathered[1, 5].view(BITS[dtype]).any()
        monkeypatch.setenv("MICRODIT_CHECK_INDICES", "1")
        with pytest.raises(ValueError, match="outside"):
            _ext.mask_tokens(src, idx)
        with pytest.raises(ValueError, match="outside"):
            _ext.unmask_tokens(gathered, idx, 123, fill)
    stream.synchronize()


# ------------------------------------------------------------------ MoE dispatch / combine kernels
MOE_SHAPES = [(2, 16, 4, 8, 16), (3, 123, 5, 36, 77), (1, 7, 3, 7, 1), (2, 9, 2, 0, 4)]  # (B, T, E, K, D)


def moe_inputs(B, T, E, K, D, dtype, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    idx = torch.stack([torch.stack([torch.randperm(T, generator=g)[:K] for _ in range(E)]) for _ in range(B)])
    idx = idx.reshape(B, E, K)
    tokens = torch.randn(B, T, D, generator=g).to(dtype)
    blocks = torch.randn(E, B, K, D, generator=g).to(dtype)
    weight = torch.rand(B, E, K, generator=g).to(dtype)
    return idx.to(device), tokens.to(device), blocks.to(device), weight.to(device)


def moe_dispatch_ref(tokens, idx, weight=None):
    B = tokens.shape[0]
    rows = tokens[torch.arange(B, device=tokens.device)[:, None, None], idx]  # (B, E, K, D)
    if weight is not None:  # in the kernels' accumulation type, rounded once
        acc = torch.float64 if tokens.dtype == torch.float64 else torch.float32
        rows = (rows.to(acc) * weight.to(acc)[..., None]).to(tokens.dtype)
    return rows.transpose(0, 1).contiguous()


def moe_combine_ref(blocks, idx, weight, T):
    E, B, K, D = blocks.shape
    out = torch.zeros(B, T, D, dtype=torch.float64, device=blocks.device)
    w = torch.ones(B, E, K, dtype=torch.float64, device=blocks.device) if weight is None else weight.double()
    for e in range(E):  # expert order, as the kernels add
        out[torch.arange(B)[:, None], idx[:, e]] += w[:, e, :, None] * blocks[e].double()
    return out


@pytest.mark.parametrize("shape", MOE_SHAPES, ids=lambda s: "B{}_T{}_E{}_K{}_D{}".format(*s))
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_moe_kernels_cpu(shape, dtype):
    B, T, E, K, D = shape
    idx, tokens, blocks, weight = moe_inputs(B, T, E, K, D, dtype)
    inv = _ext.moe_inverse(idx, T)
    expected = torch.full((B, T, E), -1, dtype=torch.int32)
    b, e, j = torch.meshgrid(torch.arange(B), torch.arange(E), torch.arange(K), indexing="ij")
    expected[b, idx, e] = j.int()
    assert torch.equal(inv, expected)
    assert_bitwise_equal(_ext.moe_dispatch(tokens, idx), moe_dispatch_ref(tokens, idx))
    assert_bitwise_equal(_ext.moe_dispatch(tokens, idx, weight), moe_dispatch_ref(tokens, idx, weight))
    # Sums of up to E products, accumulated in float (double for float64), rounded once.
    tol = {torch.float64: 1e-12, torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]
    for w in (weight, None):
        out = _ext.moe_combine(blocks, inv, w)
        torch.testing.assert_close(out.double(), moe_combine_ref(blocks, idx, w, T), rtol=tol, atol=tol)
    grad = tokens
    dblocks, dweight = _ext.moe_combine_backward(grad, blocks, idx, weight)
    assert_bitwise_equal(dblocks, moe_dispatch_ref(grad, idx, weight))
    dot = (moe_dispatch_ref(grad, idx).double() * blocks.double()).sum(-1).transpose(0, 1)
    torch.testing.assert_close(dweight.double(), dot, rtol=tol, atol=tol * max(D, 1) ** 0.5)
    only_dot = _ext.moe_combine_backward(grad, blocks, idx, weight, need_dblocks=False)
    assert only_dot[0] is None and torch.equal(only_dot[1], dweight)


def test_moe_combine_is_deterministic_and_thread_independent():
    idx, _, blocks, weight = moe_inputs(2, 300, 8, 75, 64, torch.float32)
    inv = _ext.moe_inverse(idx, 300)
    first = _ext.moe_combine(blocks, inv, weight)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(_ext.moe_combine(blocks, inv, weight), first)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(_ext.moe_combine(blocks, inv, weight), first)


def test_moe_kernel_errors():
    idx, tokens, blocks, weight = moe_inputs(2, 10, 3, 4, 5, torch.float32)
    bad = idx.clone()
    bad[1, 2, 3] = 10
    with pytest.raises(ValueError, match=r"idx\[1, 2, 3\] = 10 is out of range for T = 10"):
        _ext.moe_dispatch(tokens, bad)
    with pytest.raises(ValueError, match=r"idx\[1, 2, 3\] = 10 is out of range"):
        _ext.moe_inverse(bad, 10)
    bad = idx.clone()
    bad[0, 1, 2] = bad[0, 1, 0]
    with pytest.raises(ValueError, match=r"expert 1 of sample 0 chooses token \d+ twice \(slots 0 and 2\)"):
        _ext.moe_inverse(bad, 10)
    inv = _ext.moe_inverse(idx, 10)
    cases = [
        (lambda: _ext.moe_dispatch(tokens, idx.int()), r"idx: expected dtype torch.int64"),
        (lambda: _ext.moe_dispatch(tokens, idx[:1]), r"idx: expected shape \(B=2, E, K\)"),
        (lambda: _ext.moe_dispatch(tokens, idx, weight.double()), r"weight: expected shape \(2, 3, 4\) and dtype torch.float32"),
        (lambda: _ext.moe_combine(blocks, inv.long()), r"inv: expected an int32 tensor of shape \(B=2, T, E=3\)"),
        (lambda: _ext.moe_combine(blocks, inv[:, :3].contiguous()), r"blocks: expected at most T = 3 slots per expert"),
        (lambda: _ext.moe_combine_backward(tokens, blocks[:, :1].contiguous(), idx, weight), r"blocks: expected shape \(3, 2, 4, 5\)"),
        (lambda: _ext.moe_inverse(idx, 3), r"T: expected an int >= K = 4"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message):
            call()
    corrupt = inv.clone()
    corrupt[0, 0, 0] = 4
    with pytest.raises(ValueError, match=r"inv\[0, 0, 0\] = 4 is not a slot in \[0, K = 4\) or -1"):
        _ext.moe_combine(blocks, corrupt)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_moe_gelu_cpu_matches_torch(dtype):
    """The in-place GELU and its derivative: within a few float32 ulps of torch's (exact erf)."""
    x = torch.cat([torch.linspace(-12, 12, 200_001), torch.tensor([0.0, -0.0, 30.0, -30.0, 1e-30, -1e-30])])
    h = x.to(dtype)
    pre = h.double().requires_grad_()
    ref = torch.nn.functional.gelu(pre)
    (slope_ref,) = torch.autograd.grad(ref.sum(), pre)
    act = h.clone()
    slope = _ext.moe_gelu_(act)
    tol = {torch.float64: 1e-12, torch.float32: 6e-7, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]
    torch.testing.assert_close(act.double(), ref.detach(), rtol=tol, atol=tol)
    torch.testing.assert_close(slope.double(), slope_ref, rtol=tol, atol=tol)
    # Relative accuracy where gelu is not tiny: no worse than torch's own float32 GELU.
    if dtype == torch.float32:
        own = torch.nn.functional.gelu(h).double()
        big = ref.abs() > 1e-3
        ours_rel = ((act.double() - ref) / ref)[big].abs().max()
        torch_rel = ((own - ref) / ref)[big].abs().max()
        assert ours_rel <= 2 * torch_rel + 1e-7


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_moe_kernels_cuda(dtype):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device visible to torch")
    if not ext_cuda_built():
        pytest.skip("microdit._C was built without CUDA (nvcc not found at build time, or MICRODIT_CUDA=0)")
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        for shape in MOE_SHAPES + [(4, 1024, 8, 256, 1024), (2, 33, 3, 11, 1)]:
            B, T, E, K, D = shape
            idx, tokens, blocks, weight = moe_inputs(B, T, E, K, D, dtype, device="cuda")
            cpu = [t.cpu() for t in (idx, tokens, blocks, weight)]
            inv = _ext.moe_inverse(idx, T)
            assert torch.equal(inv.cpu(), _ext.moe_inverse(cpu[0], T))
            for w in (None, weight):
                assert_bitwise_equal(_ext.moe_dispatch(tokens, idx, w).cpu(),
                                     _ext.moe_dispatch(cpu[1], cpu[0], None if w is None else cpu[3]))
                out = _ext.moe_combine(blocks, inv, w)
                # Same order and accumulation type as the CPU kernel: equal up to FMA contraction.
                torch.testing.assert_close(out.cpu(), _ext.moe_combine(cpu[2], inv.cpu(), None if w is None else cpu[3]),
                                           rtol=1e-6, atol=1e-6 if dtype != torch.bfloat16 else 1e-2)
                assert torch.equal(_ext.moe_combine(blocks, inv, w), out)  # deterministic
            dblocks, dweight = _ext.moe_combine_backward(tokens, blocks, idx, weight)
            ref_db, ref_dw = _ext.moe_combine_backward(cpu[1], cpu[2], cpu[0], cpu[3])
            assert_bitwise_equal(dblocks.cpu(), ref_db)
            torch.testing.assert_close(dweight.cpu().double(), ref_dw.double(), rtol=1e-4, atol=1e-4 * D ** 0.5)
        h = torch.randn(1000, 77, device="cuda").to(dtype)
        act = h.clone()
        slope = _ext.moe_gelu_(act)
        act_cpu = h.cpu().clone()
        slope_cpu = _ext.moe_gelu_(act_cpu)
        tol = 1e-6 if dtype in (torch.float32, torch.float64) else 1e-2
        torch.testing.assert_close(act.cpu(), act_cpu, rtol=tol, atol=tol)
        torch.testing.assert_close(slope.cpu(), slope_cpu, rtol=tol, atol=tol)
    stream.synchronize()
