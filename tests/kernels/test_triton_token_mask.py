"""The Triton token-masking kernels (kernels/token_mask.py) and the `triton` backends of
keep_indices, mask_tokens, unmask_tokens and unmask_unpatchify: exact, forward and gradients."""
import pytest
import torch

from microdit.ops.keep_indices import drop_mask, keep_indices, keep_indices_triton_op, num_kept
from microdit.ops.mask_tokens import mask_tokens
from microdit.ops.token_rows import dropped_sum_triton, mask_tokens_triton, unmask_tokens_triton
from microdit.ops.unmask_tokens import unmask_tokens
from microdit.ops.unmask_unpatchify import gather_image_triton, unmask_unpatchify, unmask_unpatchify_triton
from tests.kernels.triton_env import DEVICE, DTYPES, reason

pytestmark = pytest.mark.skipif(reason is not None, reason=reason or "")

SHAPES = [(2, 16, 4, 8), (3, 123, 31, 77)]  # (B, T, K, D)
GRIDS = [(2, 3, 5, 2, 3, 6), (2, 8, 8, 2, 4, 16)]  # (B, grid_h, grid_w, patch, channels, K)


def ids(B, T, K, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(T, generator=g)[:K] for _ in range(B)]).to(DEVICE)


def randn(*shape, dtype, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(DEVICE, dtype).requires_grad_()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_mask_and_unmask_exact(shape, dtype):
    B, T, K, D = shape
    keep = ids(B, T, K)
    x = randn(B, T, D, dtype=dtype, seed=0)
    out, ref = (mask_tokens(x, keep, backend=b) for b in ("triton", "reference"))
    assert torch.equal(out, ref)
    go = torch.randn_like(out)
    assert torch.equal(torch.autograd.grad(out, x, go)[0], torch.autograd.grad(ref, x, go)[0])

    kept = randn(B, K, D, dtype=dtype, seed=1)
    mask_token = randn(1, 1, D, dtype=dtype, seed=2)
    out, ref = (unmask_tokens(kept, keep, T, mask_token, backend=b) for b in ("triton", "reference"))
    assert torch.equal(out, ref)
    go = torch.randn_like(out)
    (gx, gm), (gx_ref, gm_ref) = (torch.autograd.grad(o, (kept, mask_token), go) for o in (out, ref))
    assert torch.equal(gx, gx_ref)
    exact = go.double()[drop_mask(keep, T).bool()].sum(0).reshape(gm.shape)
    floor = 1e-4 if dtype == torch.float32 else 1e-1
    assert ((gm.double() - exact).abs() <= 2 * (gm_ref.double() - exact).abs() + floor).all()


@pytest.mark.parametrize("grid", GRIDS, ids=str)
def test_unmask_unpatchify_exact(grid):
    B, gh, gw, p, C, K = grid
    T = gh * gw
    keep = ids(B, T, K, seed=3)
    x = randn(B, K, p * p * C, dtype=torch.float32, seed=4)
    mask_token = randn(1, 1, p * p * C, dtype=torch.float32, seed=5)
    out, ref = (unmask_unpatchify(x, keep, T, mask_token, gh, gw, p, C, backend=b) for b in ("triton", "reference"))
    assert out.shape == (B, C, gh * p, gw * p) and torch.equal(out, ref)
    go = torch.randn_like(out)
    (gx, gm), (gx_ref, gm_ref) = (torch.autograd.grad(o, (x, mask_token), go) for o in (out, ref))
    assert torch.equal(gx, gx_ref)
    torch.testing.assert_close(gm, gm_ref, rtol=1e-5, atol=1e-5)


def test_keep_indices_match_reference():
    """The same noise gives the reference's indices, so they inherit its uniformity (a uniformly
    random subset in random order, tests/ops/test_keep_indices.py)."""
    for B, T, ratio in ((4, 77, 0.75), (64, 16, 0.5), (3, 256, 0.75)):
        g1, g2 = (torch.Generator(DEVICE).manual_seed(B) for _ in range(2))
        a = keep_indices(B, T, ratio, device=DEVICE, generator=g1, backend="triton")
        b = keep_indices(B, T, ratio, device=DEVICE, generator=g2, backend="reference")
        assert a.shape == (B, num_kept(T, ratio)) and torch.equal(a, b)


def test_opcheck():
    B, T, K, D = 3, 23, 7, 13
    keep = ids(B, T, K)
    x = randn(B, T, D, dtype=torch.float32, seed=0)
    kept = randn(B, K, D, dtype=torch.float32, seed=1)
    fill = randn(1, 1, D, dtype=torch.float32, seed=2)
    torch.library.opcheck(mask_tokens_triton, (x, keep))
    torch.library.opcheck(unmask_tokens_triton, (kept, keep, T, fill))
    torch.library.opcheck(unmask_tokens_triton, (kept, keep, T, None))
    torch.library.opcheck(dropped_sum_triton, (x.detach(), keep, T, 1, 1))
    gh, gw, p, C = 3, 5, 2, 3
    keep = ids(2, gh * gw, 6)
    x = randn(2, 6, p * p * C, dtype=torch.float32, seed=3)
    fill = randn(p * p * C, dtype=torch.float32, seed=4)
    torch.library.opcheck(unmask_unpatchify_triton, (x, keep, gh * gw, fill, gh, gw, p, C))
    img = randn(2, C, gh * p, gw * p, dtype=torch.float32, seed=5)
    torch.library.opcheck(gather_image_triton, (img, keep, gw, p))
    torch.library.opcheck(keep_indices_triton_op, (torch.rand(3, 20, device=DEVICE), 5))


def test_under_torch_compile():
    x = torch.randn(2, 16, 8, device=DEVICE)
    keep = ids(2, 16, 4)
    mt = torch.randn(1, 1, 8, device=DEVICE)

    def f(x):
        kept = mask_tokens(x, keep, backend="triton") * 2
        return unmask_unpatchify(kept, keep, 16, mt, 4, 4, 2, 2, backend="triton")

    expected = f(x)
    torch.testing.assert_close(torch.compile(f, backend="aot_eager", fullgraph=True)(x), expected)
