"""The Triton silu * mul kernels (kernels/swiglu.py) through the `triton` backend of swiglu:
forward and every gradient against the reference, and opcheck."""
import pytest
import torch

from microdit.ops import swiglu as sw
from tests.kernels.triton_env import DEVICE, DTYPES, reason

pytestmark = pytest.mark.skipif(reason is not None, reason=reason or "")
TOL = {torch.float32: dict(rtol=1e-4, atol=1e-4), torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}


def inputs(M, d, h, bias, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: (torch.randn(*s, generator=g) / s[-1] ** 0.25).to(DEVICE, dtype).requires_grad_()
    x, w1, w2, w3 = mk(3, M, d), mk(h, d), mk(h, d), mk(d, h)
    bs = (mk(h), mk(h), mk(d)) if bias else (None, None, None)
    return x, w1, w2, w3, *bs


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
@pytest.mark.parametrize("shape", [(5, 16, 32), (77, 48, 123)], ids=str)
def test_swiglu_triton(shape, bias, dtype):
    ins = inputs(*shape, bias, dtype)
    out, ref = sw.swiglu(*ins, backend="triton"), sw.swiglu(*ins, backend="reference")
    assert out.dtype == ref.dtype and out.shape == ref.shape
    torch.testing.assert_close(out, ref, **TOL[dtype])
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE, dtype)
    live = [t for t in ins if t is not None]
    for a, b in zip(torch.autograd.grad(out, live, dout), torch.autograd.grad(ref, live, dout)):
        torch.testing.assert_close(a, b, **TOL[dtype])


def test_silu_mul_kernel_and_opcheck():
    h = torch.randn(7, 2 * 45, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    torch.testing.assert_close(sw.silu_mul_triton_op(h), sw.silu_mul_reference(h), rtol=1e-5, atol=1e-6)
    torch.library.opcheck(sw.silu_mul_triton_op, (h,))
