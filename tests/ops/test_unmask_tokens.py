"""unmask_tokens backends against the reference: exact, forward and gradients."""
import pytest
import torch

from microdit.ops.keep_indices import drop_mask
from microdit.ops.unmask_tokens import unmask_tokens, unmask_tokens_op
from tests.helpers import available_backends
from tests.ops.tokens import device_of, ids, skip_unsupported

UNMASK = available_backends(unmask_tokens_op)
SHAPES = [(2, 16, 4, 8), (3, 123, 31, 77), (5, 256, 64, 96)]

@pytest.mark.parametrize("backend", UNMASK)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_unmask_tokens_exact(backend, shape, dtype):
    B, T, K, P = shape
    torch.manual_seed(1)
    dev = device_of(backend)
    x = torch.randn(B, K, P, dtype=dtype, device=dev, requires_grad=True)
    mask_token = torch.randn(1, 1, P, dtype=dtype, device=dev, requires_grad=True)
    keep = ids(B, T, K, seed=1, device=dev)
    skip_unsupported(unmask_tokens_op, backend, x, keep, T, mask_token)
    out = unmask_tokens(x, keep, T, mask_token, backend=backend)
    ref = unmask_tokens(x, keep, T, mask_token, backend="reference")
    assert torch.equal(out, ref)
    dropped = drop_mask(keep, T).bool()
    assert torch.equal(out[dropped], mask_token.reshape(1, P).expand(int(dropped.sum()), P))
    go = torch.randn_like(out)
    gx, gm = torch.autograd.grad(out, (x, mask_token), go)
    gx_ref, gm_ref = torch.autograd.grad(ref, (x, mask_token), go)
    assert torch.equal(gx, gx_ref)
    # mask_token's gradient is a sum over dropped rows, in whatever order a backend adds:
    # bounded by twice the reference's own error against a float64 sum, plus a floor.
    exact = go.double()[dropped].sum(0).reshape(gm.shape)
    floor = {torch.float64: 1e-10, torch.float32: 1e-4, torch.bfloat16: 1e-1}[dtype]
    assert ((gm.double() - exact).abs() <= 2 * (gm_ref.double() - exact).abs() + floor).all()
