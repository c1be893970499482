"""Benchmark fixtures: the devices to time on and the copy-bandwidth ceiling (the helpers are in
benches/common.py and microdit/bench/timing.py)."""
import pytest
import torch


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
