"""qk_norm (the QK-LayerNorm over all heads, into the attention layout) against the published
layers: the reference, every other CPU backend, input checks, and the attention layers using it.
The Triton kernels run in the interpreter in tests/kernels/test_triton_qk_norm.py."""
import pytest
import torch

from microdit.nn.layers import CrossAttention, SelfAttention
from microdit.ops import qk_norm as qn
from microdit.ops.opset import build_ops
from tests.helpers import available_backends

SHAPES = [(2, 16, 32, 2), (3, 77, 48, 3), (1, 5, 64, 4)]  # (B, N, h, heads)


def strided_q(B, N, h, dtype=torch.float64, seed=0, device="cpu"):
    """q as the layers see it: the first third of one qkv GEMM output (rows 3h apart)."""
    g = torch.Generator().manual_seed(seed)
    qkv = (torch.randn(B, N, 3 * h, generator=g, dtype=torch.float64) * 3 + 0.5).to(device, dtype).requires_grad_()
    return qkv, qkv[..., :h]


def test_reference_is_the_published_layernorm():
    _, q = strided_q(2, 7, 32)
    ln = torch.nn.LayerNorm(32, eps=1e-6, elementwise_affine=False)
    out = qn.qk_norm(q, 4, 1e-6, backend="reference")
    assert out.shape == (2, 7, 4, 8)
    torch.testing.assert_close(out, ln(q).view(2, 7, 4, 8), rtol=0, atol=0)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("backend", [b for b in available_backends(qn.qk_norm_op) if b not in ("reference", "triton")])
def test_qk_norm_matches_reference_fp64(backend, shape):
    B, N, h, H = shape
    qkv, q = strided_q(B, N, h)
    out, ref = (qn.qk_norm(q, H, 1e-6, backend=b) for b in (backend, "reference"))
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    go = torch.randn_like(ref)
    torch.testing.assert_close(*(torch.autograd.grad(o, qkv, go)[0] for o in (out, ref)), rtol=1e-9, atol=1e-9)


def test_bad_inputs_name_the_input():
    with pytest.raises(ValueError, match=r"x must be \(B, N, h\)"):
        qn.qk_norm(torch.randn(4, 8), 2, 1e-6, backend="reference")
    with pytest.raises(ValueError, match="h=30 is not a multiple of heads=4"):
        qn.qk_norm(torch.randn(1, 2, 30), 4, 1e-6, backend="reference")


@pytest.mark.gpu
def test_under_cuda_autocast_triton_writes_bf16_where_the_reference_writes_float32():
    """Why the fused kernel exists: the published LN under bf16 autocast on CUDA writes a
    float32 copy that attention then casts again; the triton backend writes bf16 itself."""
    _, q = strided_q(2, 64, 512, dtype=torch.bfloat16, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        ref, out = (qn.qk_norm(q, 8, 1e-6, backend=b) for b in ("reference", "triton"))
    assert ref.dtype == torch.float32 and out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, rtol=2**-7, atol=1e-5)


@pytest.mark.parametrize("layer", ["self", "cross"])
def test_attention_layers_norm_q_and_k_through_the_op(layer):
    """The layers' output is the published composition LN0(q), LN0(k) -> attention."""
    torch.manual_seed(0)
    ops = build_ops({"qk_norm": "reference", "attention": "reference"})
    x, y = torch.randn(2, 9, 32), torch.randn(2, 5, 32)
    if layer == "self":
        m = SelfAttention(32, 48, 16, 1e-6, True, ops=ops)
        out = m(x)
        q, k, v = m.qkv(x).split(48, dim=-1)
    else:
        m = CrossAttention(32, 48, 16, 1e-6, True, ops=ops)
        out = m(x, y)
        q, (k, v) = m.q_linear(x), m.kv_linear(y).split(48, dim=-1)
    heads = lambda t: t.unflatten(-1, (3, 16)).transpose(1, 2)  # (B, H, N, hd)
    q, k, v = heads(m.q_norm(q)), heads(m.k_norm(k)), heads(v)
    o = torch.softmax(q @ k.transpose(-1, -2) / 4.0, -1) @ v
    torch.testing.assert_close(out, m.proj(o.transpose(1, 2).flatten(2)), rtol=1e-5, atol=1e-6)
    assert "qk_norm=reference" in repr(m)
