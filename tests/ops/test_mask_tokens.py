"""mask_tokens backends against the reference: exact, forward and gradients; backend selection."""
import pytest
import torch

from microdit.ops.mask_tokens import mask_tokens, mask_tokens_op
from microdit.ops.unmask_tokens import unmask_tokens_op
from tests.helpers import available_backends
from tests.ops.tokens import device_of, ids, skip_unsupported

MASK = available_backends(mask_tokens_op)
SHAPES = [(2, 16, 4, 8), (3, 123, 31, 77), (5, 256, 64, 96)]

@pytest.mark.parametrize("backend", MASK)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_mask_tokens_exact(backend, shape, dtype):
    B, T, K, D = shape
    torch.manual_seed(0)
    dev = device_of(backend)
    x = torch.randn(B, T, D, dtype=dtype, device=dev, requires_grad=True)
    keep = ids(B, T, K, device=dev)
    skip_unsupported(mask_tokens_op, backend, x, keep)
    out = mask_tokens(x, keep, backend=backend)
    ref = mask_tokens(x, keep, backend="reference")
    assert torch.equal(out, ref)
    go = torch.randn_like(out)
    (g,) = torch.autograd.grad(out, x, go)
    (g_ref,) = torch.autograd.grad(ref, x, go)
    assert torch.equal(g, g_ref)


def test_explicit_unknown_backend_raises():
    from microdit.ops.registry import BackendError

    with pytest.raises(BackendError, match="no backend 'nope'"):
        mask_tokens(torch.zeros(1, 2, 3), torch.zeros(1, 1, dtype=torch.long), backend="nope")


def test_env_var_selects_backend(monkeypatch):
    monkeypatch.setenv("MICRODIT_BACKEND", "mask_tokens=reference")
    assert mask_tokens_op.pick(None, torch.zeros(1, 2, 3), torch.zeros(1, 1, dtype=torch.long)).name == "reference"
    monkeypatch.setenv("MICRODIT_BACKEND", "reference")
    assert unmask_tokens_op.resolve(None) == "reference"
