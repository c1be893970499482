"""Token masking backends against the reference: exact, forward and gradients."""
import pytest
import torch

from microdit.ops import token_mask as tm
from tests.helpers import available_backends

MASK = available_backends(tm.mask_tokens_op)
UNMASK = available_backends(tm.unmask_tokens_op)
SHAPES = [(2, 16, 4, 8), (3, 123, 31, 77), (5, 256, 64, 96)]


def ids(B, T, K, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(T, generator=g)[:K] for _ in range(B)])


@pytest.mark.parametrize("backend", MASK)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_mask_tokens_exact(backend, shape, dtype):
    B, T, K, D = shape
    x = torch.randn(B, T, D, dtype=dtype, requires_grad=True)
    keep = ids(B, T, K)
    out = tm.mask_tokens(x, keep, backend=backend)
    ref = tm.mask_tokens(x, keep, backend="reference")
    assert torch.equal(out, ref)
    go = torch.randn_like(out)
    (g,) = torch.autograd.grad(out, x, go)
    (g_ref,) = torch.autograd.grad(ref, x, go)
    assert torch.equal(g, g_ref)


@pytest.mark.parametrize("backend", UNMASK)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_unmask_tokens_exact(backend, shape, dtype):
    B, T, K, P = shape
    x = torch.randn(B, K, P, dtype=dtype, requires_grad=True)
    mask_token = torch.randn(1, 1, P, dtype=dtype, requires_grad=True)
    keep = ids(B, T, K, seed=1)
    out = tm.unmask_tokens(x, keep, T, mask_token, backend=backend)
    ref = tm.unmask_tokens(x, keep, T, mask_token, backend="reference")
    assert torch.equal(out, ref)
    dropped = tm.drop_mask(keep, T).bool()
    assert torch.equal(out[dropped], mask_token.reshape(1, P).expand(int(dropped.sum()), P))
    go = torch.randn_like(out)
    gx, gm = torch.autograd.grad(out, (x, mask_token), go)
    gx_ref, gm_ref = torch.autograd.grad(ref, (x, mask_token), go)
    assert torch.equal(gx, gx_ref)
    torch.testing.assert_close(gm, gm_ref)  # a sum over dropped rows: order may differ


@pytest.mark.parametrize("backend", available_backends(tm.keep_indices_op))
def test_keep_indices_match_reference_and_are_uniform(backend):
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    a = tm.keep_indices(4, 64, 0.75, generator=g1, backend=backend)
    b = tm.keep_indices(4, 64, 0.75, generator=g2, backend="reference")
    assert a.shape == (4, 16) and torch.equal(a, b)
    # Each token is kept with probability K/T, and each slot holds any token equally often.
    g = torch.Generator().manual_seed(0)
    draws = tm.keep_indices(4000, 16, 0.75, generator=g, backend=backend)  # K = 4
    freq = torch.bincount(draws.flatten(), minlength=16).float() / draws.numel()
    assert (freq - 1 / 16).abs().max() < 0.01
    first = torch.bincount(draws[:, 0], minlength=16).float() / 4000
    assert (first - 1 / 16).abs().max() < 0.02
    assert all(len(set(r.tolist())) == 4 for r in draws[:50])


def test_num_kept_and_errors():
    assert tm.num_kept(256, 0.75) == 64 and tm.num_kept(1024, 0.5) == 512 and tm.num_kept(10, 0.0) == 10
    with pytest.raises(ValueError, match="mask_ratio"):
        tm.num_kept(16, 1.0)
    with pytest.raises(ValueError, match="repeats"):
        tm.check_ids_keep(torch.tensor([[1, 1]]), 1, 4)
    with pytest.raises(ValueError, match="outside"):
        tm.check_ids_keep(torch.tensor([[1, 4]]), 1, 4)
    with pytest.raises(ValueError, match="shape"):
        tm.check_ids_keep(torch.tensor([1, 2]), 1, 4)


def test_explicit_unknown_backend_raises():
    from microdit.ops.registry import BackendError

    with pytest.raises(BackendError, match="no backend 'nope'"):
        tm.mask_tokens(torch.zeros(1, 2, 3), torch.zeros(1, 1, dtype=torch.long), backend="nope")


def test_env_var_selects_backend(monkeypatch):
    monkeypatch.setenv("MICRODIT_BACKEND", "mask_tokens=reference")
    assert tm.mask_tokens_op.pick(None, torch.zeros(1, 2, 3), torch.zeros(1, 1, dtype=torch.long)).name == "reference"
    monkeypatch.setenv("MICRODIT_BACKEND", "reference")
    assert tm.unmask_tokens_op.resolve(None) == "reference"
