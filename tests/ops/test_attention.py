"""Attention backends against the reference: forward and every gradient, odd shapes.

Tolerance (flash-attention's rule): a backend computing in low precision may be off the float64
answer by at most twice what the reference itself is off when run in that precision, plus a
small floor: |out - ref64| <= 2 * |ref_lowp - ref64| + 1e-5 (elementwise maximum norm).
"""
import pytest
import torch
import torch.nn.functional as F

from microdit.ops import attention as attn
from microdit.ops.registry import BackendError
from tests.helpers import available_backends

ALL = list(attn.attention_op.impls)
GPU_ONLY = ["flash_attn", "xformers", "transformer_engine"]
# (B, N, L, H, hd): self-attention (N == L) and cross-attention to 77 caption tokens, odd sizes.
SHAPES = [(2, 16, 16, 2, 32), (3, 123, 77, 3, 64), (1, 5, 7, 1, 16), (2, 64, 77, 4, 64)]


def inputs(B, N, L, H, hd, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    mk = lambda n: torch.randn(B, n, H, hd, generator=g, dtype=torch.float64).to(device).requires_grad_()
    return mk(N), mk(L), mk(L)


def definition(q, k, v):
    """Per batch and head, with explicit loops (independent of the reference's batching)."""
    out = torch.empty_like(q)
    for b in range(q.shape[0]):
        for h in range(q.shape[2]):
            s = q[b, :, h] @ k[b, :, h].T / q.shape[-1] ** 0.5
            out[b, :, h] = torch.softmax(s, -1) @ v[b, :, h]
    return out


def grads(out, inputs, seed=1):
    g = torch.Generator().manual_seed(seed)
    dout = torch.randn(out.shape, generator=g, dtype=torch.float64).to(out.device, out.dtype)
    return torch.autograd.grad(out, inputs, dout)


def device_of(backend):
    return "cuda" if backend in GPU_ONLY or torch.cuda.is_available() and backend.startswith("sdpa") else "cpu"


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_reference_matches_definition(shape):
    q, k, v = inputs(*shape)
    torch.testing.assert_close(attn.attention(q, k, v, backend="reference"), definition(q, k, v))


@pytest.mark.parametrize("backend", [b for b in available_backends(attn.attention_op) if b != "reference"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_backend_matches_reference_fp64(backend, shape):
    """Backends that take float64 (sdpa on any device) agree with the reference to rounding."""
    args = inputs(*shape, device=device_of(backend))
    if attn.attention_op.impls[backend].supports(*args):
        pytest.skip("float64 not supported by " + backend)
    out, ref = attn.attention(*args, backend=backend), attn.attention(*args, backend="reference")
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    for a, b in zip(grads(out, args), grads(ref, args)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


def check_lowp(backend, shape, dtype):
    dev = device_of(backend)
    q64, k64, v64 = inputs(*shape, device=dev)
    ref64 = attn.attention_reference(q64, k64, v64)
    g64 = grads(ref64, (q64, k64, v64))
    low = [t.detach().to(dtype).requires_grad_() for t in (q64, k64, v64)]
    ref_lp = attn.attention_reference(*low)
    g_lp = grads(ref_lp, low)
    low2 = [t.detach().clone().requires_grad_() for t in low]
    out = attn.attention(*low2, backend=backend)
    assert out.shape == ref64.shape and out.dtype == dtype
    g_out = grads(out, low2)
    for name, o, lp, r in [("out", out, ref_lp, ref64)] + [(f"d{n}", a, b, c) for n, a, b, c in zip("qkv", g_out, g_lp, g64)]:
        err = (o.double() - r).abs().max().item()
        bound = 2 * (lp.double() - r).abs().max().item() + 1e-5
        assert err <= bound, f"{backend} {name}: error {err:.3g} > 2 x reference's own {dtype} error + 1e-5 = {bound:.3g}"


@pytest.mark.parametrize("backend", ["sdpa", "sdpa_cudnn"])
@pytest.mark.parametrize("shape", SHAPES[:2], ids=str)
def test_sdpa_bf16_within_flash_rule(backend, shape):
    check_lowp(backend, shape, torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("backend", GPU_ONLY + ["sdpa", "sdpa_cudnn"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_gpu_backend_within_flash_rule(backend, shape, dtype):
    reasons = attn.attention_op.reasons(backend)
    if reasons:
        pytest.skip("; ".join(reasons))
    check_lowp(backend, shape, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_ONLY)
def test_gpu_backend_under_autocast_takes_float32_qk(backend):
    """Under autocast the QK-LayerNorm leaves q, k in float32: the backend casts, as SDPA does."""
    if attn.attention_op.reasons(backend):
        pytest.skip("; ".join(attn.attention_op.reasons(backend)))
    q, k, v = (t.detach().float() for t in inputs(2, 64, 77, 4, 64, device="cuda"))
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = attn.attention(q, k, v.bfloat16(), backend=backend)
        ref = attn.attention(q, k, v.bfloat16(), backend="sdpa")
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, ref, rtol=2e-2, atol=2e-2)


def test_sdpa_keeps_cudnn_out_and_sdpa_cudnn_puts_it_first():
    assert torch.nn.attention.SDPBackend.CUDNN_ATTENTION not in attn.SDPA_BACKENDS
    assert attn.SDPA_CUDNN_BACKENDS[0] == torch.nn.attention.SDPBackend.CUDNN_ATTENTION


def test_sdpa_pins_the_kernel(monkeypatch):
    """The call runs inside sdpa_kernel with the pinned list (the same list SDPA then sees)."""
    seen = []
    real = F.scaled_dot_product_attention

    def spy(*a, **kw):
        seen.append(torch._C._get_sdp_priority_order())  # the priority order sdpa_kernel set
        return real(*a, **kw)

    monkeypatch.setattr(attn.F, "scaled_dot_product_attention", spy)
    attn.attention(*inputs(1, 5, 7, 1, 16), backend="sdpa")
    assert seen and [int(b) for b in seen[0][:3]] == [int(b) for b in attn.SDPA_BACKENDS]


@pytest.mark.parametrize("backend", GPU_ONLY)
def test_gpu_backends_say_why_not_here(backend):
    reasons = attn.attention_op.reasons(backend)
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    assert reasons and any("CUDA" in r for r in reasons)
    with pytest.raises(BackendError, match=backend):
        attn.attention(*inputs(1, 5, 7, 1, 16), backend=backend)


def test_bad_shapes_name_the_inputs():
    q, k, v = inputs(1, 5, 7, 2, 16)
    with pytest.raises(ValueError, match="k and v"):
        attn.attention(q, k[:, :, :1], v, backend="reference")
    with pytest.raises(ValueError, match="B, N, H, head_dim"):
        attn.attention(q[0], k, v, backend="sdpa")


@pytest.mark.parametrize("backend", available_backends(attn.attention_op))
def test_compiles_without_graph_breaks(backend):
    q, k, v = (t.detach().float() for t in inputs(2, 16, 7, 2, 16))
    torch._dynamo.reset()
    explain = torch._dynamo.explain(lambda a, b, c: attn.attention(a, b, c, backend=backend))(q, k, v)
    assert explain.graph_break_count == 0, explain.break_reasons
