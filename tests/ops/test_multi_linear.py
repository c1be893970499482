"""multi_linear backends against the reference: forward and every gradient."""
import pytest
import torch

from microdit.ops import multi_linear as ml


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("outs", [[6 * 48, 6 * 48, 6 * 64], [5], [123, 77]], ids=str)
def test_fused_matches_reference_fp64(outs, bias):
    g = torch.Generator().manual_seed(0)
    mk = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).requires_grad_()
    x = mk(3, 7, 32)
    ws = [mk(o, 32) for o in outs]
    bs = [mk(o) if bias else None for o in outs]
    out, ref = ml.multi_linear(x, ws, bs, backend="fused"), ml.multi_linear(x, ws, bs, backend="reference")
    live = [x, *ws, *(b for b in bs if b is not None)]
    douts = [torch.randn_like(r) for r in ref]
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    for a, b in zip(torch.autograd.grad(out, live, douts), torch.autograd.grad(ref, live, douts)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_bad_inputs_are_named():
    x = torch.randn(2, 8)
    with pytest.raises(ValueError, match="weight 1"):
        ml.multi_linear(x, [torch.randn(3, 8), torch.randn(3, 7)], [None, None], backend="fused")
    with pytest.raises(ValueError, match="every map"):
        ml.multi_linear(x, [torch.randn(3, 8), torch.randn(3, 8)], [torch.randn(3), None], backend="fused")
