"""Expert-choice MoE layer, per backend: forward, backward, both; ms and achieved TFLOP/s.

Shapes of MicroDiT_XL_2 (8 experts, capacity 2): the patch mixer (d = 768, hidden 3072) over
all T = 256 tokens at 256 px and T = 1024 at 512 px, and an MoE backbone block (d = 1024,
hidden 3840, the last; hidden 768, the first, by layer-wise scaling) over the kept tokens with 75%
masking (64 at 256 px, 256 at 512 px). Batch per
GPU 256 at 256 px and 32 at 512 px, in bfloat16; on the CPU batch 8 and 2, in float32.

    pytest benches/bench_moe.py --benchmark-columns=min,mean,rounds
    pytest benches/bench_moe.py -k "cpu and xl-mixer-512px and both"   # the CPU bar

TFLOP/s counts the experts' useful FLOPs and the router only (not the reference's one-hot work);
on a GPU it is also given as fractions of the measured dense bf16 matmul rate and of the
datasheet's bf16 peak. GPU times are CUDA-event medians with L2 flushed before each call
(triton.testing.do_bench when Triton is installed, else microdit.bench.timing's timer). A summary with the ratio
to the reference backend is written to benches/results/moe-<device>.json.
"""
import pytest
import torch

from benches.common import ResultLog, matmul_tflops, peak_fractions, runnable_backends, skip_unless_runs_here, time_passes
from microdit.bench import timing
from microdit.ops import moe

SHAPES = {
    # name: (B on CPU, B on GPU, T, d, hidden)
    "xl-mixer-256px": (8, 256, 256, 768, 3072),
    "xl-mixer-512px": (2, 32, 1024, 768, 3072),
    "xl-backbone-256px-mask75": (8, 256, 64, 1024, 3840),
    "xl-backbone-512px-mask75": (2, 32, 256, 1024, 3840),
    # The first MoE backbone block: layer-wise scaling gives it hidden 768 (the last has 3840).
    "xl-backbone-256px-mask75-h768": (8, 256, 64, 1024, 768),
    "xl-backbone-512px-mask75-h768": (2, 32, 256, 1024, 768),
}
E, CAP = 8, 2.0
ROUNDS = {"cpu": 7, "cuda": 20}


def useful_flops(B, T, d, h, passes):
    k = moe.expert_capacity(T, E, CAP)
    fwd = 2 * B * T * d * E + 2 * 2 * B * E * k * d * h
    return fwd * {"forward": 1, "backward": 2, "both": 3}[passes]


@pytest.fixture(scope="module")
def log():
    results = ResultLog("moe")
    yield results
    results.write(key=("device", "shape", "passes"), metric="ms")


@pytest.fixture(scope="module")
def peak():
    """The dense bf16 matmul rate of this GPU, TFLOP/s: the ceiling the MoE layer is held to."""
    return matmul_tflops() if torch.cuda.is_available() else None


@pytest.mark.parametrize("passes", ["forward", "backward", "both"])
@pytest.mark.parametrize("backend", runnable_backends(moe.moe_op))
@pytest.mark.parametrize("shape", list(SHAPES))
def test_moe(benchmark, device, shape, backend, passes, log, peak):
    b_cpu, b_gpu, T, d, h = SHAPES[shape]
    B = b_cpu if device == "cpu" else b_gpu
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    skip_unless_runs_here(backend, device)
    g = torch.Generator(device).manual_seed(0)
    mk = lambda *s, sc: (torch.randn(*s, generator=g, device=device) * sc).to(dtype).requires_grad_()
    x, gate, w1, w2 = mk(B, T, d, sc=1.0), mk(E, d, sc=0.5), mk(E, d, h, sc=d**-0.5), mk(E, h, d, sc=h**-0.5)
    args = (x, gate, w1, w2)
    go = torch.randn(B, T, d, device=device, dtype=dtype)
    impl = moe.moe_op.pick(backend, *args, CAP)
    run_forward = lambda: impl.fn(*args, CAP)

    sec = time_passes(benchmark, device, run_forward, args, go, passes, ROUNDS[device], warmup_rounds=1)
    tflops = useful_flops(B, T, d, h, passes) / sec / 1e12
    info = dict(device=device, dtype=str(dtype), shape=shape, backend=backend, passes=passes, B=B, T=T, d=d, hidden=h,
                experts=E, capacity=CAP, ms=sec * 1e3, tflops=tflops)
    if device == "cuda":  # against the bf16 matmul measured here and the datasheet's bf16 peak
        info.update(peak_fractions(tflops, peak, timing.datasheet_tflops(timing.device_name("cuda"), "bf16"), "tflops"))
    benchmark.extra_info.update(info)
    log.add(info)
