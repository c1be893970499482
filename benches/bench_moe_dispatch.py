"""Expert-choice MoE layer, per backend: forward, backward, both; ms and achieved TFLOP/s.

Shapes of MicroDiT_XL_2: the mixer at 512 px (T = 1024, d = 768, hidden 3072) and the last
MoE backbone block at 256 px with 75% masking (T = 64, d = 1024, hidden 3840), 8 experts,
capacity 2. Run: `pytest benches/bench_moe_dispatch.py --benchmark-columns=min,mean,rounds`.
TFLOP/s counts the experts' useful FLOPs and the router only (not the reference's one-hot work).
"""
import pytest
import torch

from benches.conftest import sync
from microdit.ops import moe_dispatch as moe

SHAPES = {
    # name: (B on CPU, B on GPU, T, d, hidden)
    "xl-mixer-512px": (2, 32, 1024, 768, 3072),
    "xl-backbone-256px-mask75": (8, 256, 64, 1024, 3840),
}
E, CAP = 8, 2.0


def useful_flops(B, T, d, h, passes):
    k = moe.expert_capacity(T, E, CAP)
    fwd = 2 * B * T * d * E + 2 * 2 * B * E * k * d * h
    return fwd * {"forward": 1, "backward": 2, "both": 3}[passes]


@pytest.mark.parametrize("passes", ["forward", "backward", "both"])
@pytest.mark.parametrize("backend", [n for n, _, r in moe.moe_op.table() if not r])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_moe(benchmark, device, shape, backend, passes):
    b_cpu, b_gpu, T, d, h = SHAPES[shape]
    B = b_cpu if device == "cpu" else b_gpu
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    g = torch.Generator(device).manual_seed(0)
    mk = lambda *s, sc: (torch.randn(*s, generator=g, device=device) * sc).to(dtype).requires_grad_()
    x, gate, w1, w2 = mk(B, T, d, sc=1.0), mk(E, d, sc=0.5), mk(E, d, h, sc=d**-0.5), mk(E, h, d, sc=h**-0.5)
    args = (x, gate, w1, w2)
    go = torch.randn(B, T, d, device=device, dtype=dtype)

    if passes == "backward":
        def setup():
            return (moe.expert_choice_moe(*args, CAP, backend=backend),), {}

        def run(out):
            torch.autograd.grad(out, args, go)
            sync(device)
        benchmark.pedantic(run, setup=setup, rounds=5, warmup_rounds=1)
    else:
        def run():
            out = moe.expert_choice_moe(*args, CAP, backend=backend)
            if passes == "both":
                torch.autograd.grad(out, args, go)
            sync(device)
        benchmark.pedantic(run, rounds=5, warmup_rounds=1)
    sec = benchmark.stats.stats.min
    benchmark.extra_info.update(device=device, dtype=str(dtype), B=B, T=T, d=d, hidden=h, experts=E,
                                capacity=CAP, ms=sec * 1e3,
                                tflops=useful_flops(B, T, d, h, passes) / sec / 1e12)
