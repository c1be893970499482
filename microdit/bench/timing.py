"""Timing that is honest on CPU and GPU, the device's measured and datasheet peaks, and the
metadata every results file carries. The kernel benchmarks (benches/) and `microdit bench` share it."""
from __future__ import annotations

import os
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch

from .. import availability

# Dense tensor-core peaks from the vendors' datasheets, TFLOP/s without sparsity. Keys are
# substrings of torch.cuda.get_device_name(); the first match wins, so the more specific first.
DATASHEET_TFLOPS: list[tuple[str, dict[str, float]]] = [
    ("H100 PCIe", {"bf16": 756.0, "fp8": 1513.0, "fp32": 51.0}),
    ("H100 NVL", {"bf16": 835.0, "fp8": 1671.0, "fp32": 60.0}),
    ("H100", {"bf16": 989.0, "fp8": 1979.0, "fp32": 67.0}),  # SXM (H100 80GB HBM3)
    ("H200", {"bf16": 989.0, "fp8": 1979.0, "fp32": 67.0}),  # SXM, same compute as H100 SXM
    ("A100", {"bf16": 312.0, "fp32": 19.5}),
]


# Memory bandwidth from the datasheets, GB/s: the ceiling of a pure data-movement op.
DATASHEET_GBPS: list[tuple[str, float]] = [("H100 PCIe", 2000.0), ("H100 NVL", 3900.0), ("H100", 3350.0),
                                           ("H200", 4800.0), ("A100-SXM4-80GB", 2039.0), ("A100", 1555.0)]


def datasheet_gbps(name: str) -> float | None:
    """The datasheet memory bandwidth of device `name`, or None where it is not known."""
    return next((v for key, v in DATASHEET_GBPS if key in name), None)


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def device_name(device) -> str:
    """The GPU's name, or the CPU's with the threads torch uses."""
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(torch.device(device))
    return f"{platform.processor() or platform.machine()} CPU ({torch.get_num_threads()} threads)"


def datasheet_tflops(name: str, precision: str) -> float | None:
    """The datasheet peak of device `name` at `precision` (fp8 counts bf16 for the non-FP8 GEMMs
    at the FP8 rate: an upper bound), or None where the device is not known."""
    for key, peaks in DATASHEET_TFLOPS:
        if key in name:
            return peaks.get(precision)
    return None


def git_commit(cwd: str | Path | None = None) -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True,
                             check=True, cwd=cwd or Path(__file__).parent)
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):  # not a checkout: the results still count
        return "unknown"


def machine_load() -> str:
    """`uptime`'s load averages: the committed CPU numbers say how busy the machine was."""
    try:
        one, five, fifteen = os.getloadavg()
    except OSError:
        return "unknown"
    return f"load average {one:.2f} {five:.2f} {fifteen:.2f} on {os.cpu_count()} cores"


def metadata(device) -> dict:
    tri = availability.triton()
    return {"device": device_name(device), "commit": git_commit(), "torch": torch.__version__,
            "cuda": torch.version.cuda, "triton": getattr(tri, "__version__", None),
            "python": platform.python_version(), "threads": torch.get_num_threads(), "load": machine_load(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


class L2Flush:
    """Overwrites a buffer larger than the L2 cache between timed calls, so each call starts
    cold, as inside a training step where the surrounding layers evict its operands."""

    def __init__(self, device, nbytes: int = 256 * 2**20):
        self.buf = torch.empty(nbytes // 4, dtype=torch.int32, device=device)

    def __call__(self) -> None:
        self.buf.zero_()


def cuda_event_ms(fn, warmup: int = 5, reps: int = 30, flush_l2: bool = True) -> float:
    """Median milliseconds of fn() on the current CUDA stream by CUDA events, L2 flushed before each."""
    flush = L2Flush("cuda") if flush_l2 else (lambda: None)
    for _ in range(warmup):
        fn()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for s, e in zip(starts, ends):
        flush()
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends))


def wall_ms(fn, device, warmup: int = 2, reps: int = 10) -> list[float]:
    """Wall-clock milliseconds of each of `reps` calls of fn(), the device synchronised around each."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def matmul_tflops(device, dtype: torch.dtype | None = None, n: int | None = None) -> float:
    """The dense matmul rate measured here, TFLOP/s: n x n x n in bf16 on a GPU (n = 8192), fp32
    on the CPU (n = 1024, with torch's threads): the ceiling a training step is held to."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    dtype = dtype or (torch.bfloat16 if cuda else torch.float32)
    n = n or (8192 if cuda else 1024)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    if cuda:
        ms = cuda_event_ms(lambda: a @ b, flush_l2=False)  # 8192^2 operands do not fit in L2 anyway
    else:
        ms = min(wall_ms(lambda: a @ b, device, warmup=2, reps=5))  # best of: the noise here is other users
    return 2 * n**3 / (ms / 1e3) / 1e12
