"""The QK-LayerNorm per backend: forward / backward / both of LN0 over all heads of q, read
where the qkv GEMM leaves it (a strided third of its output) and handed to attention in the
dtype it takes; ms and achieved GB/s (bytes each pass must move at least: read q, write the
normalised q; the backward reads dy and q and writes dq).

On a GPU it runs under bf16 autocast, as training does: the reference's LayerNorm then writes
float32 and the timed function includes the cast to bf16 that attention would otherwise do
(a no-op for triton, which writes bf16). Shapes of MicroDiT_XL_2: backbone width 1024 over the
kept 64 tokens (256 px, batch 256 per GPU), mixer width 768 over 1024 tokens (512 px, batch
32); on the CPU batch 8 and 1 in float32.

    pytest benches/bench_qk_norm.py --benchmark-columns=min,mean,rounds
"""
import contextlib
import itertools

import pytest
import torch

from benches.common import batch_and_dtype, result_log, runnable_backends, skip_unless_runs_here, time_passes
from microdit.ops import qk_norm as qn

SHAPES = {"xl-backbone-256px-mask75": (8, 256, 64, 1024, 16), "xl-mixer-512px": (1, 32, 1024, 768, 12)}
ROUNDS = {"cpu": 5, "cuda": 20}
log = result_log("qk_norm", key=("device", "shape", "passes"))
CASES = list(itertools.product(SHAPES, runnable_backends(qn.qk_norm_op), ["forward", "backward", "both"]))


@pytest.mark.parametrize("shape,backend,passes", CASES)
def test_qk_norm(benchmark, device, shape, backend, passes, log):
    b_cpu, b_gpu, N, h, heads = SHAPES[shape]
    B, dtype = batch_and_dtype(device, b_cpu, b_gpu)
    skip_unless_runs_here(backend, device)
    g = torch.Generator(device).manual_seed(0)
    qkv = torch.randn(B, N, 3 * h, generator=g, device=device).to(dtype).requires_grad_()
    q = qkv[..., :h]
    impl = qn.qk_norm_op.pick(backend, q, heads, 1e-6)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else contextlib.nullcontext()

    def fn():
        with amp:
            return impl.fn(q, heads, 1e-6).to(dtype)  # the dtype attention takes

    go = torch.randn(B, N, heads, h // heads, device=device, dtype=dtype)
    sec = time_passes(benchmark, device, fn, (qkv,), go, passes, ROUNDS[device], warmup_rounds=1)
    tensor = B * N * h * torch.finfo(dtype).bits // 8
    moved = {"forward": 2, "backward": 3, "both": 5}[passes]
    info = dict(device=device, dtype=str(dtype), shape=shape, backend=backend, passes=passes, B=B, N=N, h=h,
                heads=heads, ms=sec * 1e3, gbps=moved * tensor / sec / 1e9)
    benchmark.extra_info.update(info)
    log.add(info)
