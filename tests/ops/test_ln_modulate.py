"""ln_modulate and residual_ln_modulate backends against the reference: forward and every gradient."""
import pytest
import torch

from microdit.ops import ln_modulate as lm
from microdit.ops import residual_ln_modulate as rlm
from tests.helpers import available_backends

SHAPES = [(2, 16, 32), (3, 123, 77), (1, 5, 64)]  # (B, N, D)


def inputs(B, N, D, dtype=torch.float64, seed=0, weight=True, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s, scale=1.0, shift=0.0: (torch.randn(*s, generator=g, dtype=torch.float64) * scale + shift).to(
        device, dtype).requires_grad_()
    x = mk(B, N, D, scale=3.0, shift=0.5)
    w = mk(D, scale=0.3, shift=1.0) if weight else None
    return x, w, mk(B, D, scale=0.5), mk(B, D, scale=0.5)


def grads(out, ins, seed=1):
    outs = out if isinstance(out, tuple) else (out,)
    g = torch.Generator().manual_seed(seed)
    douts = [torch.randn(o.shape, generator=g, dtype=torch.float64).to(o.device, o.dtype) for o in outs]
    ins = [t for t in ins if t is not None]
    return torch.autograd.grad(outs, ins, douts)


def test_reference_is_the_published_block_computation():
    x, w, shift, scale = inputs(2, 7, 16)
    ln = torch.nn.LayerNorm(16, eps=1e-6, bias=False).double()
    with torch.no_grad():
        ln.weight.copy_(w)
    expect = ln(x) * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)
    torch.testing.assert_close(lm.ln_modulate(x, w, shift, scale, 1e-6, backend="reference"), expect)


@pytest.mark.parametrize("weight", [True, False], ids=["weight", "no_weight"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("backend", [b for b in available_backends(lm.ln_modulate_op) if b not in ("reference", "triton")])
def test_ln_modulate_matches_reference_fp64(backend, shape, weight):
    x, w, shift, scale = inputs(*shape, weight=weight)
    out = lm.ln_modulate(x, w, shift, scale, 1e-6, backend=backend)
    ref = lm.ln_modulate(x, w, shift, scale, 1e-6, backend="reference")
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    for a, b in zip(grads(out, (x, w, shift, scale)), grads(ref, (x, w, shift, scale))):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("gate", [True, False], ids=["gate", "no_gate"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("backend", [b for b in available_backends(rlm.residual_ln_modulate_op)
                                     if b not in ("reference", "triton")])
def test_residual_ln_modulate_matches_reference_fp64(backend, shape, gate):
    x, w, shift, scale = inputs(*shape)
    branch, g = inputs(*shape, seed=3)[0], (inputs(*shape, seed=4)[2] if gate else None)
    ins = (x, branch, g, w, shift, scale)
    out = rlm.residual_ln_modulate(*ins, 1e-6, backend=backend)
    ref = rlm.residual_ln_modulate(*ins, 1e-6, backend="reference")
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    for a, b in zip(grads(out, ins), grads(ref, ins)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("shape", SHAPES[:2], ids=str)
def test_torch_bf16_within_reference_error(shape):
    """|out - ref64| <= 2 |ref_bf16 - ref64| + 1e-3 (flash-attention's rule), forward and gradients."""
    ins64 = inputs(*shape)
    ref64 = lm.ln_modulate_reference(*ins64, 1e-6)
    low = [t.detach().bfloat16().requires_grad_() for t in ins64]
    low2 = [t.detach().clone().requires_grad_() for t in low]
    ref_lp, out = lm.ln_modulate_reference(*low, 1e-6), lm.ln_modulate(*low2, 1e-6, backend="torch")
    assert out.dtype == torch.bfloat16
    for o, lp, r in zip((out, *grads(out, low2)), (ref_lp, *grads(ref_lp, low)), (ref64, *grads(ref64, ins64))):
        err, own = (o.double() - r).abs().max(), (lp.double() - r).abs().max()
        assert err <= 2 * own + 1e-3, (err, own)


def test_bad_shapes_name_the_input():
    x, w, shift, scale = inputs(2, 5, 16)
    with pytest.raises(ValueError, match="shift and scale"):
        lm.ln_modulate(x, w, shift[:1], scale, 1e-6, backend="torch")
    with pytest.raises(ValueError, match="weight"):
        lm.ln_modulate(x, w[:3], shift, scale, 1e-6, backend="reference")


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_compiles_without_graph_breaks(backend):
    x, w, shift, scale = (t.detach().float() for t in inputs(2, 16, 32))
    torch._dynamo.reset()
    fn = lambda *a: rlm.residual_ln_modulate(*a, 1e-6, backend=backend)
    explain = torch._dynamo.explain(fn)(x, x, shift, w, shift, scale)
    assert explain.graph_break_count == 0, explain.break_reasons
