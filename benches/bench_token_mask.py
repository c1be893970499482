"""Token masking per backend: mask (gather) and un-mask (scatter with mask_token), forward,
backward and both; ms and achieved GB/s (bytes read + written by the op itself).

Shapes of MicroDiT_XL_2: mixer width 768 at 256 px (T = 256, K = 64) and 512 px (T = 1024,
K = 256), batch per GPU 256 and 32 (CPU: 8 and 2); un-masking at p*p*C = 16 features.
Run: `pytest benches/bench_token_mask.py --benchmark-columns=min,mean,rounds`.
"""
import pytest
import torch

from benches.conftest import sync
from microdit.ops import token_mask as tm

SHAPES = {"256px": (8, 256, 256, 64), "512px": (2, 32, 1024, 256)}  # B cpu, B gpu, T, K
D_MIXER, P = 768, 16


def _backends(op):
    return [n for n, _, r in op.table() if not r]


def _bytes(B, rows_out, rows_in, width, elem):
    return (B * rows_out * width + B * rows_in * width) * elem


@pytest.mark.parametrize("passes", ["forward", "backward", "both"])
@pytest.mark.parametrize("op", ["mask", "unmask"])
@pytest.mark.parametrize("backend", sorted(set(_backends(tm.mask_tokens_op)) & set(_backends(tm.unmask_tokens_op))))
@pytest.mark.parametrize("shape", list(SHAPES))
def test_token_mask(benchmark, device, shape, backend, op, passes):
    b_cpu, b_gpu, T, K = SHAPES[shape]
    B = b_cpu if device == "cpu" else b_gpu
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    if backend in ("cuda",) and device != "cuda" or backend == "cpp" and device != "cpu":
        pytest.skip(f"backend {backend} does not run on {device}")
    g = torch.Generator(device).manual_seed(0)
    keep = tm.keep_indices(B, T, 0.75 if K * 4 == T else 1 - K / T, device=device, generator=g)
    if op == "mask":
        x = torch.randn(B, T, D_MIXER, device=device, dtype=dtype, requires_grad=True)
        fn = lambda: tm.mask_tokens(x, keep, backend=backend)
        inputs, go = (x,), torch.randn(B, K, D_MIXER, device=device, dtype=dtype)
        moved = _bytes(B, K, K, D_MIXER, x.element_size())  # read K rows, write K rows
    else:
        x = torch.randn(B, K, P, device=device, dtype=dtype, requires_grad=True)
        mt = torch.randn(1, 1, P, device=device, dtype=dtype, requires_grad=True)
        fn = lambda: tm.unmask_tokens(x, keep, T, mt, backend=backend)
        inputs, go = (x, mt), torch.randn(B, T, P, device=device, dtype=dtype)
        moved = _bytes(B, T, K, P, x.element_size())  # read K rows, write T rows
    if passes == "backward":
        def run(out):
            torch.autograd.grad(out, inputs, go)
            sync(device)
        benchmark.pedantic(run, setup=lambda: ((fn(),), {}), rounds=20, warmup_rounds=2)
    else:
        def run():
            out = fn()
            if passes == "both":
                torch.autograd.grad(out, inputs, go)
            sync(device)
        benchmark.pedantic(run, rounds=20, warmup_rounds=2)
    sec = benchmark.stats.stats.min
    factor = {"forward": 1, "backward": 1, "both": 2}[passes]
    benchmark.extra_info.update(device=device, dtype=str(dtype), B=B, T=T, K=K, ms=sec * 1e3,
                                gb_per_s=factor * moved / sec / 1e9)
