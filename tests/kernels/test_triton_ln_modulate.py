"""The Triton LayerNorm + modulate kernels (kernels/ln_modulate.py) through the `triton` backends
of ln_modulate and residual_ln_modulate: forward and every gradient against the reference."""
import pytest
import torch

from microdit.ops import ln_modulate as lm
from microdit.ops import residual_ln_modulate as rlm
from tests.kernels.triton_env import DEVICE, DTYPES, reason
from tests.ops.test_ln_modulate import grads, inputs

pytestmark = pytest.mark.skipif(reason is not None, reason=reason or "")
SHAPES = [(2, 16, 32), (3, 77, 48), (1, 5, 64)]
TOL = {torch.float32: dict(rtol=1e-4, atol=1e-4), torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("weight", [True, False], ids=["weight", "no_weight"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_ln_modulate_triton(shape, weight, dtype):
    ins = inputs(*shape, dtype=dtype, weight=weight, device=DEVICE)
    out = lm.ln_modulate(*ins, 1e-6, backend="triton")
    ref = lm.ln_modulate(*ins, 1e-6, backend="reference")
    assert out.dtype == ref.dtype
    torch.testing.assert_close(out, ref, **TOL[dtype])
    for a, b in zip(grads(out, ins), grads(ref, ins)):
        torch.testing.assert_close(a, b, **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("gate", [True, False], ids=["gate", "no_gate"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_residual_ln_modulate_triton(shape, gate, dtype):
    x, w, shift, scale = inputs(*shape, dtype=dtype, device=DEVICE)
    branch, g = inputs(*shape, dtype=dtype, seed=3, device=DEVICE)[0], (
        inputs(*shape, dtype=dtype, seed=4, device=DEVICE)[2] if gate else None)
    ins = (x, branch, g, w, shift, scale)
    out = rlm.residual_ln_modulate(*ins, 1e-6, backend="triton")
    ref = rlm.residual_ln_modulate(*ins, 1e-6, backend="reference")
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b, **TOL[dtype])
    for a, b in zip(grads(out, ins), grads(ref, ins)):
        torch.testing.assert_close(a, b, **TOL[dtype])


def test_opcheck():
    x, w, shift, scale = (t.detach() for t in inputs(2, 5, 16, dtype=torch.float32, device=DEVICE))
    torch.library.opcheck(lm.ln_modulate_triton_op, (x, w, shift, scale, 1e-6, torch.float32))
    torch.library.opcheck(rlm.residual_triton_op, (x, x.clone(), shift, w, shift, scale, 1e-6, torch.float32))
