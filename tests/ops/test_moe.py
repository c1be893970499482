"""Expert-choice MoE backends against the reference: forward and every gradient."""
import pytest
import torch
import torch.nn.functional as F

from microdit.ops import moe
from tests.helpers import available_backends

FAST = [b for b in available_backends(moe.moe_op) if b != "reference"]
SHAPES = [(2, 16, 32, 64, 4, 2.0), (3, 123, 77, 96, 5, 1.5), (2, 64, 48, 128, 8, 2.0)]


def inputs(B, T, d, h, E, dtype=torch.float64, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s, scale=1.0: (torch.randn(*s, generator=g, dtype=torch.float64) * scale).to(device, dtype).requires_grad_()
    return mk(B, T, d), mk(E, d, scale=0.5), mk(E, d, h, scale=d**-0.5), mk(E, h, d, scale=h**-0.5)


def device_of(backend: str) -> str:
    """Where a backend's inputs live: the GPU for cuda and cublaslt, and for triton outside the interpreter."""
    return "cuda" if backend in ("cuda", "cublaslt") or backend == "triton" and torch.cuda.is_available() else "cpu"


def skip_unsupported(backend, *args):
    reasons = moe.moe_op.impls[backend].supports(*args)
    if reasons:
        pytest.skip(f"backend {backend}: " + "; ".join(reasons))


def dense_moe(x, gate, w1, w2, capacity, gelu=F.gelu):
    """The definition written out token by token (independent of both backends)."""
    B, T, d = x.shape
    E = w1.shape[0]
    k = int(capacity * T / E)
    probs = (x @ gate.T).softmax(-1)
    out = torch.zeros_like(x)
    for b in range(B):
        for e in range(E):
            top = probs[b, :, e].topk(k).indices
            out[b, top] += probs[b, top, e, None] * (gelu(x[b, top] @ w1[e]) @ w2[e])
    return out


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_reference_matches_definition(shape):
    *dims, cap = shape
    x, gate, w1, w2 = inputs(*dims)
    torch.testing.assert_close(moe.expert_choice_moe(x, gate, w1, w2, cap, backend="reference"),
                               dense_moe(x, gate, w1, w2, cap))


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_backend_matches_reference_fp64(backend, shape):
    *dims, cap = shape
    args = inputs(*dims, device=device_of(backend))
    skip_unsupported(backend, *args, cap)
    out = moe.expert_choice_moe(*args, cap, backend=backend)
    ref = moe.expert_choice_moe(*args, cap, backend="reference")
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    go = torch.randn_like(out)
    grads = torch.autograd.grad(out, args, go)
    grads_ref = torch.autograd.grad(ref, args, go)
    for name, g, gr in zip(("x", "gate", "w1", "w2"), grads, grads_ref):
        torch.testing.assert_close(g, gr, rtol=1e-9, atol=1e-11, msg=f"grad {name}")


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_backend_low_precision_error_bounded_by_reference(backend, dtype):
    """|out - ref64| <= 2 |ref_lowp - ref64| + floor, for outputs and gradients."""
    B, T, d, h, E, cap = 2, 64, 48, 128, 8, 2.0
    args64 = inputs(B, T, d, h, E, device=device_of(backend))
    argsl = [a.detach().to(dtype).requires_grad_() for a in args64]
    skip_unsupported(backend, *argsl, cap)
    ref64 = moe.expert_choice_moe(*args64, cap, backend="reference")
    refl = moe.expert_choice_moe(*argsl, cap, backend="reference")
    out = moe.expert_choice_moe(*argsl, cap, backend=backend)
    # Routing can flip at near-ties in low precision; compare where both pick the same tokens.
    floor = 1e-5 if dtype == torch.float32 else 1e-2
    assert ((out.double() - ref64).abs() <= 2 * (refl.double() - ref64).abs() + floor).float().mean() > 0.99
    go = torch.randn_like(ref64)
    g64 = torch.autograd.grad(ref64, args64, go)
    gl = torch.autograd.grad(refl, argsl, go.to(dtype))
    go_ = torch.autograd.grad(out, argsl, go.to(dtype))
    for name, a, b, c in zip(("x", "gate", "w1", "w2"), go_, gl, g64):
        err, ref_err = (a.double() - c).norm(), (b.double() - c).norm()
        assert err <= 2 * ref_err + floor * c.norm(), f"grad {name}: {err} vs reference's own {ref_err}"


def test_capacity_and_unchosen_tokens_get_zero():
    x, gate, w1, w2 = inputs(1, 16, 8, 16, 4)
    assert moe.expert_capacity(16, 4, 0.5) == 2
    out = moe.expert_choice_moe(x, gate, w1, w2, 0.5, backend="reference")
    chosen = moe.route(x, gate, 2)[2].unique()
    unchosen = torch.ones(16, dtype=torch.bool)
    unchosen[chosen] = False
    assert unchosen.any() and torch.count_nonzero(out[0, unchosen]) == 0


EXT = [b for b in ("cpp", "cuda") if b in FAST]
EXT_DEVICE = "cuda" if "cuda" in EXT else "cpu"


@pytest.mark.skipif(not EXT, reason="compiled extension not available here")
def test_custom_ops_opcheck():
    B, T, E, k, d = 2, 23, 3, 7, 13
    g = torch.Generator().manual_seed(0)
    idx = torch.stack([torch.stack([torch.randperm(T, generator=g)[:k] for _ in range(E)]) for _ in range(B)]).to(EXT_DEVICE)
    mk = lambda *s: torch.randn(*s, generator=g).to(EXT_DEVICE).requires_grad_()
    x, y, gates = mk(B, T, d), mk(E, B, k, d), mk(B, E, k)
    inv = moe.moe_inverse_ext(idx, T)
    torch.library.opcheck(moe.moe_inverse_ext, (idx, T))
    torch.library.opcheck(moe.moe_dispatch_ext, (x, idx, inv))
    torch.library.opcheck(moe.moe_combine_ext, (y, gates, idx, inv))
    torch.library.opcheck(moe.moe_combine_ext, (y, None, idx, inv))
    torch.library.opcheck(moe.moe_combine_backward_ext, (x.detach(), y.detach(), gates.detach(), idx))
    torch.library.opcheck(moe.moe_gelu_ext_, (torch.randn(3, 5, 7, generator=g).to(EXT_DEVICE),))


@pytest.mark.skipif(not EXT, reason="compiled extension not available here")
def test_ext_backend_under_torch_compile():
    args = [a.detach().float().requires_grad_() for a in inputs(2, 16, 32, 64, 4, device=EXT_DEVICE)]
    f = lambda *a: moe.expert_choice_moe(*a, 2.0, backend=EXT[-1])
    out = f(*args)
    go = torch.randn_like(out)
    expected = torch.autograd.grad(out, args, go)
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    out_c = compiled(*args)
    torch.testing.assert_close(out_c, out)
    for a, b in zip(torch.autograd.grad(out_c, args, go), expected):
        torch.testing.assert_close(a, b)


@pytest.mark.skipif(not EXT, reason="compiled extension not available here")
def test_ext_backend_refuses_a_second_backward_through_one_graph():
    """Its backward reuses the saved activation's buffer: retain_graph must fail loudly."""
    args = [a.detach().float().requires_grad_() for a in inputs(2, 16, 32, 64, 4, device=EXT_DEVICE)]
    out = moe.expert_choice_moe(*args, 2.0, backend=EXT[-1])
    torch.autograd.grad(out.sum(), args, retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        torch.autograd.grad(out.sum(), args)


@pytest.mark.parametrize("backend", FAST)
def test_deterministic(backend):
    args = [a.detach().float().requires_grad_() for a in inputs(3, 123, 77, 96, 5, device=device_of(backend))]
    if moe.moe_op.impls[backend].supports(*args, 1.5):  # float32 refused (cublaslt): its own dtype
        args = [a.detach().bfloat16().requires_grad_() for a in args]
    skip_unsupported(backend, *args, 1.5)
    runs = []
    for _ in range(2):
        out = moe.expert_choice_moe(*args, 1.5, backend=backend)
        runs.append((out, *torch.autograd.grad(out, args, torch.ones_like(out))))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", FAST)
def test_only_needed_gradients(backend):
    x, gate, w1, w2 = inputs(2, 16, 32, 64, 4, device=device_of(backend))
    skip_unsupported(backend, x, gate, w1, w2, 2.0)
    x.requires_grad_(False)
    out = moe.expert_choice_moe(x, gate, w1, w2, 2.0, backend=backend)
    ref = moe.expert_choice_moe(x, gate, w1, w2, 2.0, backend="reference")
    for g, r in zip(torch.autograd.grad(out.sum(), (gate, w1)), torch.autograd.grad(ref.sum(), (gate, w1))):
        torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("backend", FAST)
def test_autocast_and_mixed_dtypes(backend):
    """Under autocast the layer runs in autocast's dtype, as the reference's matmuls do; the
    gradients come back in each input's dtype."""
    dev = device_of(backend)
    args = [a.detach().float().requires_grad_() for a in inputs(2, 16, 32, 64, 4, device=dev)]
    with torch.autocast(dev, dtype=torch.bfloat16):
        out = moe.expert_choice_moe(*args, 2.0, backend=backend)
        ref = moe.expert_choice_moe(*args, 2.0, backend="reference")
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref.float(), rtol=0.05, atol=0.05)
    grads = torch.autograd.grad(out.float().sum(), args)
    assert all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
