"""The Triton MoE kernels (kernels/moe.py) and the `triton` moe backend.

Interpreter on the CPU (float32, small odd shapes: it is slow), compiled on a GPU.
"""
import pytest
import torch
import torch.nn.functional as F

from microdit.ops import moe
from tests.kernels.triton_env import DEVICE, DTYPES, reason

pytestmark = pytest.mark.skipif(reason is not None, reason=reason or "")

# (B, T, d, hidden, E, capacity): odd sizes; capacity 1.5 gives k = 36 of T = 123.
SHAPES = [(2, 16, 32, 64, 4, 2.0), (3, 123, 77, 96, 5, 1.5)]


def inputs(B, T, d, h, E, dtype=torch.float64, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s, scale=1.0: (torch.randn(*s, generator=g, dtype=torch.float64) * scale).to(device, dtype).requires_grad_()
    return mk(B, T, d), mk(E, d, scale=0.5), mk(E, d, h, scale=d**-0.5), mk(E, h, d, scale=h**-0.5)


def kernels():
    from microdit.kernels import moe

    return moe


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_reference_within_its_own_error(shape, dtype):
    """|out - ref64| <= 2 |ref_lowp - ref64| + floor (flash-attention's rule), output and every gradient."""
    *dims, cap = shape
    args64 = inputs(*dims, device=DEVICE)
    argsl = [a.detach().to(dtype).requires_grad_() for a in args64]
    ref64 = moe.expert_choice_moe(*args64, cap, backend="reference")
    refl = moe.expert_choice_moe(*argsl, cap, backend="reference")
    out = moe.expert_choice_moe(*argsl, cap, backend="triton")
    floor = 1e-5 if dtype == torch.float32 else 1e-2
    # Routing can flip at near-ties in low precision: most elements, not all, must be close.
    close = (out.double() - ref64).abs() <= 2 * (refl.double() - ref64).abs() + floor
    assert close.float().mean() > 0.99
    go = torch.randn(ref64.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(DEVICE)
    g64 = torch.autograd.grad(ref64, args64, go)
    gl = torch.autograd.grad(refl, argsl, go.to(dtype))
    gt = torch.autograd.grad(out, argsl, go.to(dtype))
    for name, a, b, c in zip(("x", "gate", "w1", "w2"), gt, gl, g64):
        err, ref_err = (a.double() - c).norm(), (b.double() - c).norm()
        assert err <= 2 * ref_err + floor * c.norm(), f"grad {name}: {err} vs reference's own {ref_err}"


def test_router_matches_torch_topk():
    """Softmax and per-expert top-k by rank counting: torch.topk's choice, order and gates."""
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(3, 77, 5, generator=g) * 2).to(DEVICE)
    probs, gates, idx, inv = kernels().router_fwd(logits, 20, torch.float32)
    ref_probs = logits.softmax(-1)
    torch.testing.assert_close(probs, ref_probs, rtol=1e-6, atol=1e-7)
    ref_gates, ref_idx = torch.topk(probs.transpose(1, 2), 20, dim=-1)  # ranked on the same probs
    assert torch.equal(idx, ref_idx) and torch.equal(gates, ref_gates)
    expected = torch.full((3, 77, 5), -1, dtype=torch.int32, device=DEVICE)
    b, e, j = torch.meshgrid(*(torch.arange(n, device=DEVICE) for n in (3, 5, 20)), indexing="ij")
    expected[b, idx, e] = j.int()
    assert torch.equal(inv, expected)


def test_router_ties_go_to_the_lower_index():
    logits = torch.zeros(1, 9, 2, device=DEVICE)  # every probability 0.5
    _, gates, idx, inv = kernels().router_fwd(logits, 4, torch.float32)
    assert idx.tolist() == [[[0, 1, 2, 3], [0, 1, 2, 3]]] and bool((gates == 0.5).all())


@pytest.mark.parametrize("gather", [0, 1, 2])
def test_grouped_gemm_gathers_and_epilogues(gather):
    g = torch.Generator().manual_seed(gather)
    E, rows_total, m, k, n = 3, 50, 37, 45, 29
    mk = lambda *s: torch.randn(*s, generator=g).to(DEVICE)
    b = mk(E, k, n)
    K = kernels()
    if gather == 0:
        a = mk(E, m, k)
        a_dense = a
        out = K.grouped_gemm(a, b, m=m, k=k, a_strides=a.stride())
    elif gather == 1:  # A's rows from a shared table
        table = mk(rows_total, k)
        rows = torch.randint(0, rows_total, (E, m), generator=g).to(DEVICE)
        a_dense = table[rows]
        out = K.grouped_gemm(table, b, m=m, k=k, rows=rows, gather=1, a_strides=(0, k, 1))
    else:  # A = table[rows]^T: the gathered rows are the reduction
        table = mk(rows_total, m)
        rows = torch.randint(0, rows_total, (E, k), generator=g).to(DEVICE)
        a_dense = table[rows].transpose(1, 2)
        out = K.grouped_gemm(table, b, m=m, k=k, rows=rows, gather=2, a_strides=(0, 1, m))
    torch.testing.assert_close(out, a_dense @ b, rtol=1e-5, atol=1e-5)
    if gather == 1:
        act, slope = K.grouped_gemm(table, b, m=m, k=k, rows=rows, gather=1, a_strides=(0, k, 1), epilogue=1)
        pre = (a_dense @ b).requires_grad_()
        (ref_slope,) = torch.autograd.grad(F.gelu(pre).sum(), pre)
        torch.testing.assert_close(act, F.gelu(pre.detach()), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(slope, ref_slope, rtol=1e-5, atol=1e-5)
        aux = mk(E, m, n)
        scaled = K.grouped_gemm(table, b, m=m, k=k, rows=rows, gather=1, a_strides=(0, k, 1), epilogue=2, aux=aux)
        torch.testing.assert_close(scaled, (a_dense @ b) * aux, rtol=1e-5, atol=1e-5)


def test_combine_is_deterministic_and_exact_for_one_expert_per_token():
    g = torch.Generator().manual_seed(0)
    B, T, E, k, D = 2, 40, 4, 10, 33
    idx = torch.stack([torch.randperm(T, generator=g)[: E * k].view(E, k) for _ in range(B)]).to(DEVICE)
    y = torch.randn(E, B * k, D, generator=g).to(DEVICE)
    gates = torch.rand(B, E, k, generator=g).to(DEVICE)
    K = kernels()
    inv = K.router_fwd(torch.zeros(B, T, E, device=DEVICE), k, torch.float32)[3]  # shape only
    inv.fill_(-1)
    b, e, j = torch.meshgrid(*(torch.arange(n, device=DEVICE) for n in (B, E, k)), indexing="ij")
    inv[b, idx, e] = j.int()
    out = K.combine_fwd(y, inv, gates, B)
    ref = torch.zeros(B, T, D, device=DEVICE)
    ref[b, idx] = gates[..., None] * y.view(E, B, k, D).permute(1, 0, 2, 3)
    assert torch.equal(out, ref)  # each token has one (expert, slot): a single product, exact
    assert torch.equal(K.combine_fwd(y, inv, gates, B), out)


def test_opcheck():
    x, gate, w1, w2 = (a.detach().float().requires_grad_() for a in inputs(2, 16, 32, 64, 4, device=DEVICE))
    torch.library.opcheck(moe.moe_triton_fwd, (x, gate, w1, w2, 8))
    saved = moe.moe_triton_fwd(x, gate, w1, w2, 8)
    grad = torch.randn_like(saved[0])
    torch.library.opcheck(moe.moe_triton_bwd, (grad, x.detach(), gate.detach(), w1.detach(), w2.detach(),
                                               *(t.detach() for t in saved[1:])))


def test_under_torch_compile():
    args = [a.detach().float().requires_grad_() for a in inputs(2, 16, 32, 64, 4, device=DEVICE)]
    f = lambda *a: moe.expert_choice_moe(*a, 2.0, backend="triton")
    expected = f(*args)
    torch.testing.assert_close(torch.compile(f, backend="aot_eager", fullgraph=True)(*args), expected)
