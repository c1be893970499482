"""The token-op benchmarks' shared part (bench_keep_indices, bench_mask_tokens, bench_unmask_tokens,
bench_unmask_unpatchify): shapes, inputs, bytes moved, timing and the summary row.

Shapes of MicroDiT_XL_2: mixer width 768 at 256 px (T = 256, K = 64) and 512 px (T = 1024,
K = 256), batch per GPU 256 and 32 (CPU: 8 and 2); un-masking at p*p*C = 16 features (patch 2,
4 latent channels), on a 16x16 or 32x32 token grid. GB/s count the bytes read + written by the
op itself (the masking backward: K rows read, T written, as its zero-filled scatter does); on a
GPU also as fractions of the measured copy bandwidth (a large tensor's clone) and the datasheet's.
"""
import math

import pytest
import torch

from benches.common import ResultLog, peak_fractions, runnable_backends, skip_unless_runs_here, time_passes
from microdit.bench import timing
from microdit.ops.keep_indices import keep_indices, keep_indices_op
from microdit.ops.mask_tokens import mask_tokens, mask_tokens_op
from microdit.ops.unmask_tokens import unmask_tokens, unmask_tokens_op
from microdit.ops.unmask_unpatchify import unmask_unpatchify, unmask_unpatchify_op

SHAPES = {"256px": (8, 256, 256, 64), "512px": (2, 32, 1024, 256)}  # B cpu, B gpu, T, K
D_MIXER, PATCH, CHANNELS = 768, 2, 4
P = PATCH * PATCH * CHANNELS
PASSES = ["forward", "backward", "both"]


def result_log(name: str):
    """A module fixture's body: the ResultLog of benches/results/<name>-<device>.json."""
    results = ResultLog(name)
    yield results
    results.write(key=("device", "shape", "op", "passes"), metric="ms")


def bench_token_op(benchmark, device, shape, op, backend, passes, log, copy_gbps):
    """Time one token op ("keep_indices", "mask", "unmask" or "unmask_unpatchify") on one backend."""
    b_cpu, b_gpu, T, K = SHAPES[shape]
    B = b_cpu if device == "cpu" else b_gpu
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    skip_unless_runs_here(backend, device)
    if op == "keep_indices" and passes != "forward":
        pytest.skip("keep_indices has no backward")
    g = torch.Generator(device).manual_seed(0)
    ratio = 1 - K / T
    keep = keep_indices(B, T, ratio, device=device, generator=g)
    grid = int(math.isqrt(T))
    if op == "keep_indices":
        fn = lambda: keep_indices(B, T, ratio, device=device, generator=g, backend=backend)
        inputs, go = (), None
        fwd_bytes = bwd_bytes = B * T * 4 + B * K * 8  # noise read, indices written
    elif op == "mask":
        x = torch.randn(B, T, D_MIXER, device=device, dtype=dtype, requires_grad=True)
        fn = lambda: mask_tokens(x, keep, backend=backend)
        inputs, go = (x,), torch.randn(B, K, D_MIXER, device=device, dtype=dtype)
        fwd_bytes = 2 * B * K * D_MIXER * x.element_size()  # read K rows, write K rows
        # The backward scatters into a zeroed (B, T, D) gradient: K rows read, all T rows written.
        bwd_bytes = (B * T + B * K) * D_MIXER * x.element_size()
    else:
        x = torch.randn(B, K, P, device=device, dtype=dtype, requires_grad=True)
        mt = torch.randn(1, 1, P, device=device, dtype=dtype, requires_grad=True)
        if op == "unmask":
            fn = lambda: unmask_tokens(x, keep, T, mt, backend=backend)
            go = torch.randn(B, T, P, device=device, dtype=dtype)
        else:
            fn = lambda: unmask_unpatchify(x, keep, T, mt, grid, grid, PATCH, CHANNELS, backend=backend)
            go = torch.randn(B, CHANNELS, grid * PATCH, grid * PATCH, device=device, dtype=dtype)
        inputs = (x, mt)
        # Forward: read K rows, write T; backward: read all T gradient rows (K gathered, the other
        # T - K summed into mask_token's gradient), write K.
        fwd_bytes = bwd_bytes = (B * T + B * K) * P * x.element_size()
    rounds = 20 if device == "cuda" or op != "keep_indices" else 10
    sec = time_passes(benchmark, device, fn, inputs, go, passes, rounds, warmup_rounds=2)
    moved = {"forward": fwd_bytes, "backward": bwd_bytes, "both": fwd_bytes + bwd_bytes}[passes]
    gbps = moved / sec / 1e9
    info = dict(device=device, dtype=str(dtype), shape=shape, op=op, backend=backend, passes=passes,
                B=B, T=T, K=K, ms=sec * 1e3, gb_per_s=gbps)
    if device == "cuda":  # against the copy bandwidth measured here and the datasheet's
        info.update(peak_fractions(gbps, copy_gbps, timing.datasheet_gbps(timing.device_name("cuda")), "gb_per_s"))
    benchmark.extra_info.update(info)
    log.add(info)


OPS = {"keep_indices": keep_indices_op, "mask": mask_tokens_op, "unmask": unmask_tokens_op,
       "unmask_unpatchify": unmask_unpatchify_op}


def token_bench(op: str, results: str):
    """The test function and `log` fixture of benches/bench_<results>.py, timing token op `op`
    on every runnable backend, shape and pass; the summary goes to results/<results>-<device>.json."""

    @pytest.fixture(scope="module", name="log")
    def log():
        yield from result_log(results)

    @pytest.mark.parametrize("passes", ["forward"] if op == "keep_indices" else PASSES)
    @pytest.mark.parametrize("backend", runnable_backends(OPS[op]))
    @pytest.mark.parametrize("shape", list(SHAPES))
    def test(benchmark, device, shape, backend, passes, log, copy_gbps):
        bench_token_op(benchmark, device, shape, op, backend, passes, log, copy_gbps)

    test.__name__ = test.__qualname__ = f"test_{results}"
    return test, log
