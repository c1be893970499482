"""Attention core per backend at the MicroDiT_XL_2 shapes: forward, backward, both; ms and TFLOP/s.

Shapes (head_dim 64): the patch mixer's self-attention over all 256 tokens (256 px) and 1024
(512 px), 12 heads; the backbone's over the kept 64 and 256 tokens (75% masking), 16 heads;
cross-attention of those 64 kept tokens to 77 caption tokens. Batch per GPU 256 at 256 px and
32 at 512 px in bfloat16; on the CPU batch 4 and 1 in float32.

    pytest benches/bench_attention.py --benchmark-columns=min,mean,rounds

TFLOP/s counts 4 * B * H * N * L * hd per forward (QK^T and PV). Summary with the ratio to the
reference backend: benches/results/attention-<device>.json.
"""
import pytest
import torch

from benches.common import ResultLog, runnable_backends, skip_unless_runs_here, time_passes
from microdit.ops import attention as attn

SHAPES = {
    # name: (B on CPU, B on GPU, N, L, heads)
    "xl-mixer-256px": (4, 256, 256, 256, 12),
    "xl-mixer-512px": (1, 32, 1024, 1024, 12),
    "xl-backbone-256px-mask75": (4, 256, 64, 64, 16),
    "xl-backbone-512px-mask75": (1, 32, 256, 256, 16),
    "xl-cross-256px-77-captions": (4, 256, 64, 77, 16),
}
HEAD_DIM = 64
GPU_ONLY = ("flash_attn", "xformers", "transformer_engine")
ROUNDS = {"cpu": 5, "cuda": 20}


@pytest.fixture(scope="module")
def log():
    results = ResultLog("attention")
    yield results
    results.write(key=("device", "shape", "passes"), metric="ms")


@pytest.mark.parametrize("passes", ["forward", "backward", "both"])
@pytest.mark.parametrize("backend", runnable_backends(attn.attention_op))
@pytest.mark.parametrize("shape", list(SHAPES))
def test_attention(benchmark, device, shape, backend, passes, log):
    b_cpu, b_gpu, N, L, H = SHAPES[shape]
    B = b_cpu if device == "cpu" else b_gpu
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    if backend in GPU_ONLY and device != "cuda":
        pytest.skip(f"backend {backend} runs on cuda")
    skip_unless_runs_here(backend, device)
    g = torch.Generator(device).manual_seed(0)
    mk = lambda n: torch.randn(B, n, H, HEAD_DIM, generator=g, device=device).to(dtype).requires_grad_()
    q, k, v = mk(N), mk(L), mk(L)
    go = torch.randn(B, N, H, HEAD_DIM, device=device, dtype=dtype)
    impl = attn.attention_op.pick(backend, q, k, v)
    sec = time_passes(benchmark, device, lambda: impl.fn(q, k, v), (q, k, v), go, passes, ROUNDS[device],
                      warmup_rounds=1)
    flops = 4 * B * H * N * L * HEAD_DIM * {"forward": 1, "backward": 2.5, "both": 3.5}[passes]
    info = dict(device=device, dtype=str(dtype), shape=shape, backend=backend, passes=passes, B=B, N=N, L=L, heads=H,
                head_dim=HEAD_DIM, ms=sec * 1e3, tflops=flops / sec / 1e12)
    benchmark.extra_info.update(info)
    log.add(info)
