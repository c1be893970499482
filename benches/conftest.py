"""Shared benchmark helpers: device description and timing that is honest on CPU and GPU."""
import platform
import subprocess

import pytest
import torch


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except Exception:  # not a checkout: the results still count, without a commit
        return "unknown"


def sync(device: str):
    if device == "cuda":
        torch.cuda.synchronize()


@pytest.fixture(params=["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def device(request):
    return request.param


@pytest.fixture(scope="module")
def copy_gbps():
    """This GPU's copy bandwidth (clone of 1 GiB), GB/s: the ceiling of a pure data-movement op."""
    if not torch.cuda.is_available():
        return None
    from benches.common import cuda_event_ms

    x = torch.empty(2**28, device="cuda", dtype=torch.float32)
    return 2 * x.numel() * 4 / (cuda_event_ms(x.clone) / 1e3) / 1e9
