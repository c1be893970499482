"""A built CUDA extension the driver cannot run is found by a probe launch and not chosen."""
import logging

import pytest

from microdit import availability
from microdit.ops import moe as moe_ops


class FakeCudaExtension:
    """An extension that says it was built with CUDA; its kernels fail to launch."""

    def build_info(self):
        return {"cuda": True}

    def mask_tokens_cuda(self, *args):
        raise RuntimeError("CUDA error: the provided PTX was compiled with an unsupported toolchain")


@pytest.fixture
def failing_probe(monkeypatch):
    monkeypatch.setattr(availability, "extension", lambda: FakeCudaExtension())
    monkeypatch.setattr(availability, "cuda_reasons", lambda: [])  # as if a GPU were visible
    # The probe itself: what _probe_launch does with tensors, here without a GPU.
    monkeypatch.setattr(availability, "_probe_launch", lambda ext: ext.mask_tokens_cuda())
    availability.extension_cuda_probe_reasons.cache_clear()
    moe_ops.moe_op._available.clear()
    yield
    availability.extension_cuda_probe_reasons.cache_clear()
    moe_ops.moe_op._available.clear()


def test_probe_failure_is_a_reason(failing_probe):
    reasons = availability.extension_cuda_reasons()
    assert len(reasons) == 1 and "probe launch" in reasons[0] and "unsupported toolchain" in reasons[0]


def test_registry_falls_back_with_the_probe_reason(failing_probe, caplog):
    op = moe_ops.moe_op
    assert "probe launch" in "; ".join(op.reasons("cuda"))
    assert op.default() != "cuda"
    # An explicit choice of the broken backend fails with the reason instead of crashing later.
    with pytest.raises(Exception, match="probe launch"):
        op.resolve("cuda")


def test_probe_runs_once(monkeypatch):
    calls = []
    monkeypatch.setattr(availability, "extension", lambda: FakeCudaExtension())
    monkeypatch.setattr(availability, "cuda_reasons", lambda: [])
    monkeypatch.setattr(availability, "_probe_launch", lambda ext: calls.append(1))
    availability.extension_cuda_probe_reasons.cache_clear()
    try:
        assert availability.extension_cuda_reasons() == []
        assert availability.extension_cuda_reasons() == []
        assert calls == [1]
    finally:
        availability.extension_cuda_probe_reasons.cache_clear()
