"""unmask_unpatchify backends against the composition unpatchify(unmask_tokens(...)): exact, gradients."""
import pytest
import torch

from microdit.ops.keep_indices import drop_mask
from microdit.ops.unmask_tokens import unmask_tokens
from microdit.ops.unmask_unpatchify import unmask_unpatchify, unmask_unpatchify_op, unpatchify
from tests.helpers import available_backends
from tests.ops.tokens import device_of, ids, skip_unsupported

FUSED = available_backends(unmask_unpatchify_op)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("grid", [(2, 3, 5, 2, 3, 6), (2, 16, 16, 2, 4, 64)], ids=str)  # (B, gh, gw, p, C, K)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_unmask_unpatchify_equals_the_composition(backend, grid, dtype):
    B, gh, gw, p, C, K = grid
    T = gh * gw
    torch.manual_seed(2)
    dev = device_of(backend)
    x = torch.randn(B, K, p * p * C, dtype=dtype, device=dev, requires_grad=True)
    mask_token = torch.randn(1, 1, p * p * C, dtype=dtype, device=dev, requires_grad=True)
    keep = ids(B, T, K, seed=2, device=dev)
    skip_unsupported(unmask_unpatchify_op, backend, x, keep, T, mask_token, gh, gw, p, C)
    out = unmask_unpatchify(x, keep, T, mask_token, gh, gw, p, C, backend=backend)
    ref = unpatchify(unmask_tokens(x, keep, T, mask_token, backend="reference"), gh, gw, p, C)
    assert out.shape == (B, C, gh * p, gw * p) and torch.equal(out, ref)
    go = torch.randn_like(out)
    (gx, gm), (gx_ref, gm_ref) = (torch.autograd.grad(o, (x, mask_token), go) for o in (out, ref))
    assert torch.equal(gx, gx_ref)
    dropped = drop_mask(keep, T).bool()
    patches = go.double().reshape(B, C, gh, p, gw, p).permute(0, 2, 4, 3, 5, 1).reshape(B, T, -1)
    exact = patches[dropped].sum(0).reshape(gm.shape)
    floor = {torch.float32: 1e-4, torch.bfloat16: 1e-1}[dtype]
    assert ((gm.double() - exact).abs() <= 2 * (gm_ref.double() - exact).abs() + floor).all()


def test_unpatchify_is_the_models():
    import microdit

    model = microdit.create_model("MicroDiT_Test_2")
    cfg = model.config
    h = w = 4
    x = torch.randn(2, h * w, cfg.patch_size**2 * cfg.in_channels)
    assert torch.equal(unpatchify(x, h, w, cfg.patch_size, cfg.in_channels), model.unpatchify(x, h, w))


def test_unmask_unpatchify_checks_the_grid():
    with pytest.raises(ValueError, match="needs num_tokens = 12 and 12 features"):
        unmask_unpatchify(torch.zeros(1, 2, 12), torch.zeros(1, 2, dtype=torch.long), 16, torch.zeros(12), 3, 4, 2, 3)
