"""The Triton QK-LayerNorm kernels (kernels/qk_norm.py) through the `triton` backend of qk_norm:
strided q/k rows as the qkv GEMM leaves them, forward and gradient against the reference, the
output written in the dtype asked for, and opcheck."""
import pytest
import torch

from microdit.ops import qk_norm as qn
from tests.kernels.triton_env import DEVICE, DTYPES, reason
from tests.ops.test_qk_norm import SHAPES, strided_q

pytestmark = pytest.mark.skipif(reason is not None, reason=reason or "")
TOL = {torch.float32: dict(rtol=1e-4, atol=1e-4), torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_qk_norm_triton(shape, dtype):
    B, N, h, H = shape
    qkv, q = strided_q(B, N, h, dtype=dtype, device=DEVICE)
    out = qn.qk_norm(q, H, 1e-6, backend="triton")
    ref = qn.qk_norm(q, H, 1e-6, backend="reference")
    assert out.shape == ref.shape == (B, N, H, h // H) and out.dtype == ref.dtype
    torch.testing.assert_close(out, ref, **TOL[dtype])
    go = torch.randn(ref.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE, dtype)
    (g_out,), (g_ref,) = (torch.autograd.grad(o, qkv, go) for o in (out, ref))
    torch.testing.assert_close(g_out, g_ref, **TOL[dtype])
    assert g_out[..., h:].abs().max() == 0  # k and v untouched


def test_writes_the_dtype_asked_for():
    """The kernel stores straight into the output dtype (bf16 under autocast on a GPU): the
    values are the float32 result rounded once (within one bf16 unit; the interpreter rounds
    toward zero, a GPU to nearest)."""
    _, q = strided_q(2, 5, 32, dtype=torch.float32, device=DEVICE)
    y, mean, rstd = qn.qk_norm_triton_op(q.detach(), 1e-6, torch.bfloat16)
    assert y.dtype == torch.bfloat16 and mean.dtype == rstd.dtype == torch.float32
    ref = torch.nn.functional.layer_norm(q.detach(), (32,), eps=1e-6)
    torch.testing.assert_close(y.float(), ref, rtol=2**-7, atol=1e-6)


def test_opcheck():
    _, q = strided_q(2, 5, 16, dtype=torch.float32, device=DEVICE)
    torch.library.opcheck(qn.qk_norm_triton_op, (q.detach(), 1e-6, torch.float32))
