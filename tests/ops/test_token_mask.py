"""Token masking backends against the reference: exact, forward and gradients."""
import pytest
import torch

from microdit.ops import token_mask as tm
from tests.helpers import available_backends

MASK = available_backends(tm.mask_tokens_op)
UNMASK = available_backends(tm.unmask_tokens_op)
SHAPES = [(2, 16, 4, 8), (3, 123, 31, 77), (5, 256, 64, 96)]


def ids(B, T, K, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(T, generator=g)[:K] for _ in range(B)]).to(device)


def device_of(backend: str) -> str:
    """Where a backend's inputs live: the GPU for cuda, and for triton outside the interpreter."""
    return "cuda" if backend == "cuda" or backend == "triton" and torch.cuda.is_available() else "cpu"


def skip_unsupported(op, backend, *args):
    reasons = op.impls[backend].supports(*args)
    if reasons:
        pytest.skip(f"backend {backend}: " + "; ".join(reasons))


@pytest.mark.parametrize("backend", MASK)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_mask_tokens_exact(backend, shape, dtype):
    B, T, K, D = shape
    torch.manual_seed(0)
    dev = device_of(backend)
    x = torch.randn(B, T, D, dtype=dtype, device=dev, requires_grad=True)
    keep = ids(B, T, K, device=dev)
    skip_unsupported(tm.mask_tokens_op, backend, x, keep)
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
    torch.manual_seed(1)
    dev = device_of(backend)
    x = torch.randn(B, K, P, dtype=dtype, device=dev, requires_grad=True)
    mask_token = torch.randn(1, 1, P, dtype=dtype, device=dev, requires_grad=True)
    keep = ids(B, T, K, seed=1, device=dev)
    skip_unsupported(tm.unmask_tokens_op, backend, x, keep, T, mask_token)
    out = tm.unmask_tokens(x, keep, T, mask_token, backend=backend)
    ref = tm.unmask_tokens(x, keep, T, mask_token, backend="reference")
    assert torch.equal(out, ref)
    dropped = tm.drop_mask(keep, T).bool()
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


@pytest.mark.parametrize("backend", available_backends(tm.keep_indices_op))
def test_keep_indices_match_reference_and_are_uniform(backend):
    dev = device_of(backend)
    g1, g2 = torch.Generator(dev).manual_seed(3), torch.Generator(dev).manual_seed(3)
    a = tm.keep_indices(4, 64, 0.75, device=dev, generator=g1, backend=backend)
    b = tm.keep_indices(4, 64, 0.75, device=dev, generator=g2, backend="reference")
    assert a.shape == (4, 16) and torch.equal(a, b)
    # Each token is kept with probability K/T, and each slot holds any token equally often.
    g = torch.Generator(dev).manual_seed(0)
    draws = tm.keep_indices(4000, 16, 0.75, device=dev, generator=g, backend=backend).cpu()  # K = 4
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


EXT = [b for b in ("cpp", "cuda") if b in MASK]


@pytest.mark.skipif(not EXT, reason="compiled extension not available here")
def test_custom_ops_opcheck():
    dev = "cuda" if "cuda" in EXT else "cpu"
    x = torch.randn(3, 123, 77, device=dev, requires_grad=True)
    keep = ids(3, 123, 31).to(dev)
    torch.library.opcheck(tm.gather_tokens_ext, (x, keep))
    src = torch.randn(3, 31, 77, device=dev, requires_grad=True)
    fill = torch.randn(1, 1, 77, device=dev, requires_grad=True)
    torch.library.opcheck(tm.scatter_tokens_ext, (src, keep, 123, fill))
    torch.library.opcheck(tm.scatter_tokens_ext, (src, keep, 123, None))


@pytest.mark.skipif(not EXT, reason="compiled extension not available here")
def test_custom_ops_under_torch_compile():
    x = torch.randn(2, 16, 8)
    keep = ids(2, 16, 4)
    mt = torch.randn(1, 1, 8)

    def f(x):
        return tm.unmask_tokens(tm.mask_tokens(x, keep, backend="cpp") * 2, keep, 16, mt, backend="cpp")

    expected = f(x)  # eager first, as a built model does: backend availability is then cached
    torch.testing.assert_close(torch.compile(f, backend="eager", fullgraph=True)(x), expected)


FUSED = available_backends(tm.unmask_unpatchify_op)


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
    skip_unsupported(tm.unmask_unpatchify_op, backend, x, keep, T, mask_token, gh, gw, p, C)
    out = tm.unmask_unpatchify(x, keep, T, mask_token, gh, gw, p, C, backend=backend)
    ref = tm.unpatchify(tm.unmask_tokens(x, keep, T, mask_token, backend="reference"), gh, gw, p, C)
    assert out.shape == (B, C, gh * p, gw * p) and torch.equal(out, ref)
    go = torch.randn_like(out)
    (gx, gm), (gx_ref, gm_ref) = (torch.autograd.grad(o, (x, mask_token), go) for o in (out, ref))
    assert torch.equal(gx, gx_ref)
    dropped = tm.drop_mask(keep, T).bool()
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
    assert torch.equal(tm.unpatchify(x, h, w, cfg.patch_size, cfg.in_channels), model.unpatchify(x, h, w))


def test_unmask_unpatchify_checks_the_grid():
    with pytest.raises(ValueError, match="needs num_tokens = 12 and 12 features"):
        tm.unmask_unpatchify(torch.zeros(1, 2, 12), torch.zeros(1, 2, dtype=torch.long), 16, torch.zeros(12), 3, 4, 2, 3)
