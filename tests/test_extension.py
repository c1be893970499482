"""The compiled extension microdit._C: build, CPU kernels against torch, errors, CUDA build."""
from __future__ import annotations

import os
import re
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


def find_nvcc() -> str | None:
    """Where setup.py would find nvcc (PATH, $CUDA_HOME/bin, /usr/local/cuda/bin)."""
    found = shutil.which("nvcc")
    homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    candidates = [found] + [os.path.join(h, "bin", "nvcc") for h in homes if h]
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


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
    assert hasattr(ext, "gather_tokens_cuda") == info["cuda"]


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
    assert_bitwise_equal(_ext.gather_tokens(src, idx), gather_ref(src, idx))


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
    assert_bitwise_equal(_ext.scatter_tokens(src, idx, T, fill), scatter_ref(src, idx, T, fill))


def test_scatter_inverts_gather_cpu():
    src, idx, _ = make_inputs(2, 50, 50, 33, torch.bfloat16)  # K == T: a permutation
    assert_bitwise_equal(_ext.scatter_tokens(_ext.gather_tokens(src, idx), idx, 50), src)


def test_gather_indices_may_repeat_cpu():
    src, _, _ = make_inputs(2, 10, 0, 6, torch.float32)
    idx = torch.tensor([[3, 3, 0, 9, 9, 9, 1, 2, 2, 5, 5, 5]] * 2)  # K > T is fine for gather
    assert_bitwise_equal(_ext.gather_tokens(src, idx), gather_ref(src, idx))


def test_out_argument_cpu():
    src, idx, fill = make_inputs(3, 40, 11, 13, torch.float16)
    out = torch.empty(3, 11, 13, dtype=torch.float16)
    assert _ext.gather_tokens(src, idx, out=out) is out
    assert_bitwise_equal(out, gather_ref(src, idx))
    out2 = torch.full((3, 40, 13), 7.0, dtype=torch.float16)
    assert _ext.scatter_tokens(out, idx, 40, fill, out=out2) is out2
    assert_bitwise_equal(out2, scatter_ref(out, idx, 40, fill))


# ------------------------------------------------------------------ errors
@pytest.mark.parametrize("bad", [123, 1000, -1])
def test_gather_out_of_range_raises_before_writing(bad):
    src, idx, _ = make_inputs(3, 123, 31, 77, torch.float32)
    idx[1, 5] = bad
    out = torch.full((3, 31, 77), 42.0)
    with pytest.raises(ValueError, match=rf"idx\[1, 5\] = {bad} is out of range for T = 123"):
        _ext.gather_tokens(src, idx, out=out)
    assert bool((out == 42.0).all()), "nothing may be written when an index is invalid"


def test_scatter_bad_indices_raise_before_writing():
    full, idx, fill = make_inputs(2, 30, 10, 8, torch.float32)
    src = gather_ref(full, idx).contiguous()
    out = torch.full((2, 30, 8), 42.0)
    bad = idx.clone()
    bad[1, 3] = 30
    with pytest.raises(ValueError, match=r"idx\[1, 3\] = 30 is out of range"):
        _ext.scatter_tokens(src, bad, 30, fill, out=out)
    bad = idx.clone()
    bad[0, 7] = bad[0, 2]
    with pytest.raises(ValueError, match=rf"idx\[0\] repeats token {int(bad[0, 2])} \(at k = 2 and k = 7\)"):
        _ext.scatter_tokens(src, bad, 30, fill, out=out)
    assert bool((out == 42.0).all()), "nothing may be written when an index is invalid"


def test_wrong_arguments_name_the_argument():
    src, idx, fill = make_inputs(3, 20, 5, 8, torch.float32)
    kept = gather_ref(src, idx).contiguous()
    cases = [
        (lambda: _ext.gather_tokens(src[0], idx), r"src: expected a 3-d tensor, got shape \(20, 8\)"),
        (lambda: _ext.gather_tokens(src.int(), idx), r"src: expected dtype float32, float16, bfloat16, float64, got torch.int32"),
        (lambda: _ext.gather_tokens(src.transpose(1, 2), idx), r"src: expected a contiguous tensor"),
        (lambda: _ext.gather_tokens(src, idx[:2]), r"idx: expected shape \(B=3, K\) to match src, got shape \(2, 5\)"),
        (lambda: _ext.gather_tokens(src, idx.int()), r"idx: expected dtype torch.int64"),
        (lambda: _ext.gather_tokens(src, idx[0]), r"idx: expected a 2-d tensor"),
        (lambda: _ext.gather_tokens(src, idx.to("meta")), r"idx: expected a tensor on cpu"),
        (lambda: _ext.gather_tokens(src, idx, out=torch.empty(3, 5, 9)), r"out: expected shape \(3, 5, 8\)"),
        (lambda: _ext.gather_tokens(src, idx, out=src[:, :5]), r"out: expected a contiguous tensor|out: expected a tensor that does not share memory"),
        (lambda: _ext.scatter_tokens(kept, idx[:, :4].contiguous(), 20), r"idx: expected shape \(B=3, K=5\) to match src, got shape \(3, 4\)"),
        (lambda: _ext.scatter_tokens(kept, idx, 4), r"T: expected an int >= K = 5"),
        (lambda: _ext.scatter_tokens(kept, idx, 20.0), r"T: expected an int"),
        (lambda: _ext.scatter_tokens(kept, idx, 20, fill[:7]), r"fill: expected a tensor of D = 8 elements"),
        (lambda: _ext.scatter_tokens(kept, idx, 20, fill.double()), r"fill: expected dtype torch.float32"),
        (lambda: _ext.scatter_tokens(kept, idx, 20, fill, out=torch.empty(3, 19, 8)), r"out: expected shape \(3, 20, 8\)"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message):
            call()


def test_raw_entry_points_check_their_arguments():
    ext = extension()
    with pytest.raises(ValueError, match=r"unknown dtype code 7"):
        ext.gather_tokens_cpu(0, 0, 0, 1, 1, 1, 1, 7)
    with pytest.raises(ValueError, match=r"sizes must be non-negative"):
        ext.gather_tokens_cpu(0, 0, 0, -1, 1, 1, 1, 0)
    with pytest.raises(ValueError, match=r"idx is a null pointer"):
        ext.gather_tokens_cpu(0, 0, 0, 1, 1, 1, 1, 0)
    with pytest.raises(ValueError, match=r"K = 3 kept tokens cannot exceed T = 2"):
        ext.scatter_tokens_cpu(0, 0, 0, 0, 1, 2, 3, 1, 0)


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
                got = _ext.gather_tokens(s, idx)
                assert_bitwise_equal(got, gather_ref(s, idx))
                for f in (None, fill, fill.reshape(1, 1, D)):
                    assert_bitwise_equal(_ext.scatter_tokens(got, idx, T, f), scatter_ref(got, idx, T, f))
        src, idx, fill = make_inputs(3, 123, 31, 77, dtype, device="cuda")
        idx[1, 5] = 123
        gathered = _ext.gather_tokens(src, idx)  # out-of-range: a zero row, nothing out of bounds
        assert not gathered[1, 5].view(BITS[dtype]).any()
        monkeypatch.setenv("MICRODIT_CHECK_INDICES", "1")
        with pytest.raises(ValueError, match="outside"):
            _ext.gather_tokens(src, idx)
        with pytest.raises(ValueError, match="outside"):
            _ext.scatter_tokens(gathered, idx, 123, fill)
    stream.synchronize()
