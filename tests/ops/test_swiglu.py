"""swiglu backends against the reference (forward and every gradient), and silu_mul's backward."""
import pytest
import torch

from microdit.ops import swiglu as sw
from tests.helpers import available_backends


def inputs(M, d, h, bias, seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).requires_grad_()
    x, w1, w2, w3 = mk(3, M, d), mk(h, d), mk(h, d), mk(d, h)
    bs = (mk(h), mk(h), mk(d)) if bias else (None, None, None)
    return x, w1, w2, w3, *bs


@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
@pytest.mark.parametrize("shape", [(5, 16, 32), (77, 48, 123)], ids=str)
@pytest.mark.parametrize("backend", [b for b in available_backends(sw.swiglu_op) if b != "reference"])
def test_swiglu_matches_reference_fp64(backend, shape, bias):
    ins = inputs(*shape, bias)
    out, ref = sw.swiglu(*ins, backend=backend), sw.swiglu(*ins, backend="reference")
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    dout = torch.randn_like(out)
    live = [t for t in ins if t is not None]
    for a, b in zip(torch.autograd.grad(out, live, dout), torch.autograd.grad(ref, live, dout)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_silu_mul_gradcheck_and_errors():
    h = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(sw.silu_mul, (h,))
    with pytest.raises(ValueError, match="even"):
        sw.silu_mul(torch.randn(2, 5))
    with pytest.raises(ValueError, match="same shape"):
        sw.swiglu(torch.randn(2, 4), torch.randn(3, 4), torch.randn(2, 4), torch.randn(4, 3), backend="fused")


@pytest.mark.parametrize("backend", ["reference", "fused"])
def test_compiles_without_graph_breaks(backend):
    x, w1, w2, w3, *_ = (t.detach().float() if t is not None else None for t in inputs(5, 16, 32, False))
    torch._dynamo.reset()
    explain = torch._dynamo.explain(lambda *a: sw.swiglu(*a, backend=backend))(x, w1, w2, w3)
    assert explain.graph_break_count == 0, explain.break_reasons
