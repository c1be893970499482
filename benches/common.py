"""What the op benchmarks (benches/bench_<op>.py) share: GPU timing by CUDA events, the backends
to time, the forward / backward / both measurement, and the JSON summary per benchmark file."""
import json
import platform
import time
from pathlib import Path

import pytest
import torch

from microdit import availability
from microdit.bench import timing
from microdit.bench.timing import device_name, git_commit, sync

RESULTS = Path(__file__).parent / "results"


def cuda_event_ms(fn) -> float:
    """Median milliseconds of fn() on the current CUDA stream by CUDA events, with L2 flushed
    before each call: triton.testing.do_bench where Triton is installed (it flushes the same
    way), else microdit.bench.timing's event timer."""
    tri = availability.triton()
    if tri:
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=5, rep=50, return_mode="median"))
    return timing.cuda_event_ms(fn)


def matmul_tflops() -> float:
    """This GPU's dense bf16 matmul rate measured now (8192^3), TFLOP/s."""
    return timing.matmul_tflops("cuda")


def peak_fractions(value: float, measured: float | None, datasheet: float | None, unit: str) -> dict:
    """`value` as a fraction of the measured and of the datasheet ceiling (where known)."""
    out = {}
    if measured:
        out.update({f"measured_{unit}": measured, "fraction_of_measured": value / measured})
    if datasheet:
        out.update({f"datasheet_{unit}": datasheet, "fraction_of_datasheet": value / datasheet})
    return out


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


def result_log(name: str, key: tuple[str, ...], metric: str = "ms"):
    """A module fixture `log` (assign it: `log = result_log(...)`): a ResultLog written to
    benches/results/<name>-<device>.json when the module's benchmarks are done."""
    @pytest.fixture(scope="module")
    def log():
        results = ResultLog(name)
        yield results
        results.write(key=key, metric=metric)
    return log


def batch_and_dtype(device: str, b_cpu: int, b_gpu: int) -> tuple[int, torch.dtype]:
    """The benchmarks' batch and dtype on `device`: the CPU's smaller batch in float32, the
    GPU's training batch in bfloat16."""
    return (b_cpu, torch.float32) if device == "cpu" else (b_gpu, torch.bfloat16)


def runnable_backends(op) -> list[str]:
    """The backends of `op` that can run on this machine."""
    return [n for n, _, r in op.table() if not r]


def skip_unless_runs_here(backend: str, device: str) -> None:
    runs_on = {"cuda": "cuda", "cpp": "cpu"}.get(backend, device)
    if runs_on != device:
        pytest.skip(f"backend {backend} runs on {runs_on}")
    if backend == "triton" and device == "cpu":
        pytest.skip("Triton on the CPU is the interpreter: a correctness tool, not a benchmark")


def _wall_s(fn, inputs, go, passes: str) -> float:
    """Seconds of one call of `passes` of fn() on the CPU, timed directly (backward: the backward alone)."""
    out = fn() if passes == "backward" else None
    t0 = time.perf_counter()
    if passes == "backward":
        torch.autograd.grad(out, inputs, go)
    else:
        out = fn()
        if passes == "both":
            torch.autograd.grad(out, inputs, go)
    return time.perf_counter() - t0


def time_passes(benchmark, device: str, fn, inputs, go, passes: str, rounds: int, warmup_rounds: int) -> float:
    """Seconds of `passes` ("forward", "backward" or "both") of fn() with respect to `inputs`
    under output gradient `go`: pytest-benchmark's minimum on the CPU, CUDA-event medians on a
    GPU (backward = both - forward)."""
    if passes == "backward":
        def run(out):
            torch.autograd.grad(out, inputs, go)
            sync(device)
        benchmark.pedantic(run, setup=lambda: ((fn(),), {}), rounds=rounds, warmup_rounds=warmup_rounds)
    else:
        def run():
            out = fn()
            if passes == "both":
                torch.autograd.grad(out, inputs, go)
            sync(device)
        benchmark.pedantic(run, rounds=rounds, warmup_rounds=warmup_rounds)
    if device != "cuda":
        if benchmark.stats is None:  # --benchmark-disable: pytest-benchmark ran it once, kept no statistics
            return min(_wall_s(fn, inputs, go, passes) for _ in range(max(rounds, 1)))
        return benchmark.stats.stats.min
    both = lambda: torch.autograd.grad(fn(), inputs, go)
    ms = {"forward": lambda: cuda_event_ms(fn), "both": lambda: cuda_event_ms(both),
          "backward": lambda: cuda_event_ms(both) - cuda_event_ms(fn)}[passes]()
    return ms / 1e3
