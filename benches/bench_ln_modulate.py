"""The block's fused elementwise ops per backend: LayerNorm + modulate and gated residual +
LayerNorm + modulate, forward / backward / both; ms and achieved GB/s (bytes each pass must
move at least: read x (and branch), write the outputs; the backward reads dy, x and writes dx).

Shapes of MicroDiT_XL_2: backbone d = 1024 over the kept 64 tokens (256 px, batch 256 per GPU)
and the mixer d = 768 over 1024 tokens (512 px, batch 32); on the CPU batch 8 and 1.

    pytest benches/bench_ln_modulate.py --benchmark-columns=min,mean,rounds
"""
import pytest
import torch

from benches.common import ResultLog, runnable_backends, skip_unless_runs_here, time_passes
from microdit.ops import ln_modulate as lm
from microdit.ops import residual_ln_modulate as rlm

SHAPES = {"xl-backbone-256px-mask75": (8, 256, 64, 1024), "xl-mixer-512px": (1, 32, 1024, 768)}
ROUNDS = {"cpu": 5, "cuda": 20}
OPS = {"ln_modulate": lm.ln_modulate_op, "residual_ln_modulate": rlm.residual_ln_modulate_op}


@pytest.fixture(scope="module")
def log():
    results = ResultLog("ln_modulate")
    yield results
    results.write(key=("device", "op", "shape", "passes"), metric="ms")


@pytest.mark.parametrize("passes", ["forward", "backward", "both"])
@pytest.mark.parametrize("op_backend", [(o, b) for o, op in OPS.items() for b in runnable_backends(op)],
                         ids=lambda ob: f"{ob[0]}-{ob[1]}")
@pytest.mark.parametrize("shape", list(SHAPES))
def test_ln_modulate(benchmark, device, shape, op_backend, passes, log):
    op_name, backend = op_backend
    b_cpu, b_gpu, N, D = SHAPES[shape]
    B = b_cpu if device == "cpu" else b_gpu
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    skip_unless_runs_here(backend, device)
    g = torch.Generator(device).manual_seed(0)
    mk = lambda *s: torch.randn(*s, generator=g, device=device).to(dtype).requires_grad_()
    x, w, shift, scale = mk(B, N, D), mk(D), mk(B, D), mk(B, D)
    if op_name == "ln_modulate":
        impl = lm.ln_modulate_op.pick(backend, x, w, shift, scale, 1e-6)
        ins, fn, reads, writes = (x, w, shift, scale), lambda: impl.fn(x, w, shift, scale, 1e-6), 1, 1
    else:
        branch, gate = mk(B, N, D), mk(B, D)
        impl = rlm.residual_ln_modulate_op.pick(backend, x, branch, gate, w, shift, scale, 1e-6)
        ins, fn, reads, writes = (x, branch, gate, w, shift, scale), lambda: impl.fn(
            x, branch, gate, w, shift, scale, 1e-6)[1], 2, 2
    go = torch.randn(B, N, D, device=device, dtype=dtype)
    sec = time_passes(benchmark, device, fn, ins, go, passes, ROUNDS[device], warmup_rounds=1)
    tensor = B * N * D * torch.finfo(dtype).bits // 8
    moved = {"forward": reads + writes, "backward": 3 + (reads - 1), "both": reads + writes + 3 + (reads - 1)}[passes]
    info = dict(device=device, dtype=str(dtype), op=op_name, shape=shape, backend=backend, passes=passes, B=B, N=N, D=D,
                ms=sec * 1e3, gbps=moved * tensor / sec / 1e9)
    benchmark.extra_info.update(info)
    log.add(info)
