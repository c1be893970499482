"""Expert-choice MoE layer, per backend: forward, backward, both; ms and achieved TFLOP/s.

Shapes of MicroDiT_XL_2 (8 experts, capacity 2): the patch mixer (d = 768, hidden 3072) over
all T = 256 tokens at 256 px and T = 1024 at 512 px, and an MoE backbone block (d = 1024,
hidden 3840) over the kept tokens with 75% masking (64 at 256 px, 256 at 512 px). Batch per
GPU 256 at 256 px and 32 at 512 px, in bfloat16; on the CPU batch 8 and 2, in float32.

    pytest benches/bench_moe_dispatch.py --benchmark-columns=min,mean,rounds
    pytest benches/bench_moe_dispatch.py -k "cpu and xl-mixer-512px and both"   # the CPU bar

TFLOP/s counts the experts' useful FLOPs and the router only (not the reference's one-hot work);
on a GPU it is also given as a fraction of the measured dense bf16 matmul rate. GPU times are
CUDA-event medians (triton.testing.do_bench) when Triton is installed. A summary with the ratio
to the reference backend is written to benches/results/moe_dispatch-<device>.json.
"""
import json
import platform
from pathlib import Path

import pytest
import torch

from benches.conftest import device_name, git_commit, sync
from microdit import availability
from microdit.ops import moe_dispatch as moe

RESULTS = Path(__file__).parent / "results"


# ---------------------------------------------------------------- shared with bench_token_mask.py
def cuda_event_ms(fn) -> float:
    """Median milliseconds of fn() on the current CUDA stream, by CUDA events."""
    tri = availability.triton()
    if tri:
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=5, rep=50, return_mode="median"))
    fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(20):
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def matmul_tflops(n: int = 8192) -> float:
    """This GPU's dense bf16 matmul rate (torch.matmul, n x n x n), TFLOP/s."""
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    return 2 * n**3 / (cuda_event_ms(lambda: a @ b) / 1e3) / 1e12


class ResultLog:
    """Collects one dict per benchmark and writes benches/results/<name>-<device>.json, with the
    ratio of each backend's time to the reference backend's, measured in the same run."""

    def __init__(self, name: str):
        self.name, self.rows = name, []

    def add(self, row: dict) -> None:
        self.rows.append(row)

    def write(self, key: tuple[str, ...], metric: str = "ms") -> None:
        tri = availability.triton()
        for device in sorted({r["device"] for r in self.rows}):
            rows = [dict(r) for r in self.rows if r["device"] == device]
            ref = {tuple(r[k] for k in key): r[metric] for r in rows if r["backend"] == "reference"}
            for r in rows:
                base = ref.get(tuple(r[k] for k in key))
                if base:
                    r["speedup_vs_reference"] = base / r[metric]
            RESULTS.mkdir(exist_ok=True)
            meta = dict(device=device_name(device), python=platform.python_version(), torch=torch.__version__,
                        triton=getattr(tri, "__version__", None), commit=git_commit(), threads=torch.get_num_threads())
            path = RESULTS / f"{self.name}-{device}.json"
            path.write_text(json.dumps({"meta": meta, "results": rows}, indent=1))

SHAPES = {
    # name: (B on CPU, B on GPU, T, d, hidden)
    "xl-mixer-256px": (8, 256, 256, 768, 3072),
    "xl-mixer-512px": (2, 32, 1024, 768, 3072),
    "xl-backbone-256px-mask75": (8, 256, 64, 1024, 3840),
    "xl-backbone-512px-mask75": (2, 32, 256, 1024, 3840),
}
E, CAP = 8, 2.0
ROUNDS = {"cpu": 7, "cuda": 20}


def useful_flops(B, T, d, h, passes):
    k = moe.expert_capacity(T, E, CAP)
    fwd = 2 * B * T * d * E + 2 * 2 * B * E * k * d * h
    return fwd * {"forward": 1, "backward": 2, "both": 3}[passes]


@pytest.fixture(scope="module")
def log():
    results = ResultLog("moe_dispatch")
    yield results
    results.write(key=("device", "shape", "passes"), metric="ms")


@pytest.fixture(scope="module")
def peak():
    """The dense bf16 matmul rate of this GPU, TFLOP/s: the ceiling the MoE layer is held to."""
    return matmul_tflops() if torch.cuda.is_available() else None


@pytest.mark.parametrize("passes", ["forward", "backward", "both"])
@pytest.mark.parametrize("backend", [n for n, _, r in moe.moe_op.table() if not r])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_moe(benchmark, device, shape, backend, passes, log, peak):
    b_cpu, b_gpu, T, d, h = SHAPES[shape]
    B = b_cpu if device == "cpu" else b_gpu
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    runs_on = {"cuda": "cuda", "cpp": "cpu"}.get(backend, device)
    if runs_on != device:
        pytest.skip(f"backend {backend} runs on {runs_on}")
    if backend == "triton" and device == "cpu":
        pytest.skip("Triton on the CPU is the interpreter: a correctness tool, not a benchmark")
    g = torch.Generator(device).manual_seed(0)
    mk = lambda *s, sc: (torch.randn(*s, generator=g, device=device) * sc).to(dtype).requires_grad_()
    x, gate, w1, w2 = mk(B, T, d, sc=1.0), mk(E, d, sc=0.5), mk(E, d, h, sc=d**-0.5), mk(E, h, d, sc=h**-0.5)
    args = (x, gate, w1, w2)
    go = torch.randn(B, T, d, device=device, dtype=dtype)
    impl = moe.moe_op.pick(backend, *args, CAP)
    run_forward = lambda: impl.fn(*args, CAP)

    if passes == "backward":
        def setup():
            return (run_forward(),), {}

        def run(out):
            torch.autograd.grad(out, args, go)
            sync(device)
        benchmark.pedantic(run, setup=setup, rounds=ROUNDS[device], warmup_rounds=1)
    else:
        def run():
            out = run_forward()
            if passes == "both":
                torch.autograd.grad(out, args, go)
            sync(device)
        benchmark.pedantic(run, rounds=ROUNDS[device], warmup_rounds=1)
    sec = benchmark.stats.stats.min
    if device == "cuda":  # CUDA events rather than wall clock; backward = both - forward
        both = lambda: torch.autograd.grad(run_forward(), args, go)
        ms = {"forward": lambda: cuda_event_ms(run_forward), "both": lambda: cuda_event_ms(both),
              "backward": lambda: cuda_event_ms(both) - cuda_event_ms(run_forward)}[passes]()
        sec = ms / 1e3
    tflops = useful_flops(B, T, d, h, passes) / sec / 1e12
    info = dict(device=device, dtype=str(dtype), shape=shape, backend=backend, passes=passes, B=B, T=T, d=d, hidden=h,
                experts=E, capacity=CAP, ms=sec * 1e3, tflops=tflops)
    if peak:
        info.update(matmul_tflops=peak, fraction_of_matmul=tflops / peak)
    benchmark.extra_info.update(info)
    log.add(info)
