"""Token masking per backend: mask (gather), un-mask (scatter with mask_token), un-mask fused
with un-patchify, forward, backward and both; ms and achieved GB/s (bytes read + written by
the op itself), and keep-index generation.

Shapes of MicroDiT_XL_2: mixer width 768 at 256 px (T = 256, K = 64) and 512 px (T = 1024,
K = 256), batch per GPU 256 and 32 (CPU: 8 and 2); un-masking at p*p*C = 16 features (patch 2,
4 latent channels), on a 16x16 or 32x32 token grid.

    pytest benches/bench_token_mask.py --benchmark-columns=min,mean,rounds

On a GPU the GB/s are also given as a fraction of the measured copy bandwidth (a large
tensor's clone); times there are CUDA-event medians. A summary with the ratio to the reference
backend is written to benches/results/token_mask-<device>.json.
"""
import math

import pytest
import torch

from benches.bench_moe_dispatch import ResultLog, cuda_event_ms
from benches.conftest import sync
from microdit.ops import token_mask as tm

SHAPES = {"256px": (8, 256, 256, 64), "512px": (2, 32, 1024, 256)}  # B cpu, B gpu, T, K
D_MIXER, PATCH, CHANNELS = 768, 2, 4
P = PATCH * PATCH * CHANNELS
OPS = {"mask": tm.mask_tokens_op, "unmask": tm.unmask_tokens_op, "unmask_unpatchify": tm.unmask_unpatchify_op,
       "keep_indices": tm.keep_indices_op}


def _backends(op):
    return [n for n, _, r in op.table() if not r]


@pytest.fixture(scope="module")
def log():
    results = ResultLog("token_mask")
    yield results
    results.write(key=("device", "shape", "op", "passes"), metric="ms")


@pytest.fixture(scope="module")
def copy_gbps():
    """This GPU's copy bandwidth (clone of 1 GiB), GB/s: the ceiling of a pure data-movement op."""
    if not torch.cuda.is_available():
        return None
    x = torch.empty(2**28, device="cuda", dtype=torch.float32)
    return 2 * x.numel() * 4 / (cuda_event_ms(x.clone) / 1e3) / 1e9


CASES = [(op, b) for op, o in OPS.items() for b in _backends(o)]


@pytest.mark.parametrize("passes", ["forward", "backward", "both"])
@pytest.mark.parametrize("op,backend", CASES, ids=[f"{o}-{b}" for o, b in CASES])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_token_mask(benchmark, device, shape, op, backend, passes, log, copy_gbps):
    b_cpu, b_gpu, T, K = SHAPES[shape]
    B = b_cpu if device == "cpu" else b_gpu
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    runs_on = {"cuda": "cuda", "cpp": "cpu"}.get(backend, device)
    if runs_on != device:
        pytest.skip(f"backend {backend} runs on {runs_on}")
    if backend == "triton" and device == "cpu":
        pytest.skip("Triton on the CPU is the interpreter: a correctness tool, not a benchmark")
    if op == "keep_indices" and passes != "forward":
        pytest.skip("keep_indices has no backward")
    g = torch.Generator(device).manual_seed(0)
    ratio = 1 - K / T
    keep = tm.keep_indices(B, T, ratio, device=device, generator=g)
    grid = int(math.isqrt(T))
    if op == "keep_indices":
        fn = lambda: tm.keep_indices(B, T, ratio, device=device, generator=g, backend=backend)
        inputs, go, moved = (), None, B * T * 4 + B * K * 8  # noise read, indices written
    elif op == "mask":
        x = torch.randn(B, T, D_MIXER, device=device, dtype=dtype, requires_grad=True)
        fn = lambda: tm.mask_tokens(x, keep, backend=backend)
        inputs, go = (x,), torch.randn(B, K, D_MIXER, device=device, dtype=dtype)
        moved = 2 * B * K * D_MIXER * x.element_size()  # read K rows, write K rows
    else:
        x = torch.randn(B, K, P, device=device, dtype=dtype, requires_grad=True)
        mt = torch.randn(1, 1, P, device=device, dtype=dtype, requires_grad=True)
        if op == "unmask":
            fn = lambda: tm.unmask_tokens(x, keep, T, mt, backend=backend)
            go = torch.randn(B, T, P, device=device, dtype=dtype)
        else:
            fn = lambda: tm.unmask_unpatchify(x, keep, T, mt, grid, grid, PATCH, CHANNELS, backend=backend)
            go = torch.randn(B, CHANNELS, grid * PATCH, grid * PATCH, device=device, dtype=dtype)
        inputs = (x, mt)
        moved = (B * T + B * K) * P * x.element_size()  # read K rows, write T rows
    rounds = 20 if device == "cuda" or op != "keep_indices" else 10
    if passes == "backward":
        def run(out):
            torch.autograd.grad(out, inputs, go)
            sync(device)
        benchmark.pedantic(run, setup=lambda: ((fn(),), {}), rounds=rounds, warmup_rounds=2)
    else:
        def run():
            out = fn()
            if passes == "both":
                torch.autograd.grad(out, inputs, go)
            sync(device)
        benchmark.pedantic(run, rounds=rounds, warmup_rounds=2)
    sec = benchmark.stats.stats.min
    if device == "cuda":  # CUDA events rather than wall clock; backward = both - forward
        both = lambda: torch.autograd.grad(fn(), inputs, go)
        ms = {"forward": lambda: cuda_event_ms(fn), "both": lambda: cuda_event_ms(both),
              "backward": lambda: cuda_event_ms(both) - cuda_event_ms(fn)}[passes]()
        sec = ms / 1e3
    factor = {"forward": 1, "backward": 1, "both": 2}[passes]
    gbps = factor * moved / sec / 1e9
    info = dict(device=device, dtype=str(dtype), shape=shape, op=op, backend=backend, passes=passes,
                B=B, T=T, K=K, ms=sec * 1e3, gb_per_s=gbps)
    if copy_gbps:
        info.update(copy_gb_per_s=copy_gbps, fraction_of_copy=gbps / copy_gbps)
    benchmark.extra_info.update(info)
    log.add(info)
