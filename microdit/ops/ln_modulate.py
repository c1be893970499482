"""LayerNorm + adaLN modulate: LN(x) * w * (1 + scale) + shift, shift and scale per sample.

x (B, N, D), weight (D,) or None (the published LNs have a weight and no bias), shift and scale
(B, D). Backends:
- reference: `modulate(layer_norm(x), shift, scale)` as the published block computes it (two
  passes forward, and autograd keeps LN's output as well as x).
- torch: one autograd node; saves x and the per-row mean and 1/std only, and computes the
  backward in closed form (what torch.compile then fuses into one loop).
- triton: kernels/ln_modulate.py, one kernel forward and one backward; the output is written
  in autocast's dtype (bf16 straight from the kernel, no float32 copy then a cast).
The automatic choice is triton where it runs, else reference: in eager mode on a CPU the torch
backend's closed form is several passes and measured 5x slower than torch's native LayerNorm
(benches/bench_ln_modulate.py, XL backbone shape, forward+backward: 186 ms vs 36 ms); it is
for torch.compile, which fuses it, and for its smaller saved state.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..availability import triton_available_reasons, triton_device_reasons
from .registry import Op

ln_modulate_op = Op("ln_modulate", "LayerNorm(x) * w * (1 + scale) + shift, per-sample shift/scale")


def check_inputs(x, weight, shift, scale):
    """Readable errors for inputs that are not x (B, N, D), weight (D,), shift and scale (B, D)."""
    if x.dim() != 3:
        raise ValueError(f"ln_modulate: x must be (B, N, D), got {tuple(x.shape)}")
    B, _, D = x.shape
    if shift.shape != (B, D) or scale.shape != (B, D):
        raise ValueError(f"ln_modulate: shift and scale must be (B={B}, D={D}); got {tuple(shift.shape)}, "
                         f"{tuple(scale.shape)}")
    if weight is not None and weight.shape != (D,):
        raise ValueError(f"ln_modulate: weight must be (D={D},), got {tuple(weight.shape)}")


def modulate(x, shift, scale):
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


@ln_modulate_op.register("reference", priority=0)
def ln_modulate_reference(x, weight, shift, scale, eps):
    """Published: LayerNorm, then modulate."""
    check_inputs(x, weight, shift, scale)
    return modulate(F.layer_norm(x, (x.shape[-1],), weight, None, eps), shift, scale)


def acc_dtype(x):
    """Statistics and gradients in float32, or float64 for float64 inputs."""
    return torch.promote_types(x.dtype, torch.float32)


def ln_stats(x, eps):
    """Per-row mean and 1/std of x (B, N, 1), in float32 or wider."""
    xf = x.to(acc_dtype(x))
    var, mean = torch.var_mean(xf, dim=-1, keepdim=True, correction=0)
    return mean, torch.rsqrt(var + eps)


def ln_modulate_backward(dy, x, weight, scale, mean, rstd):
    """Closed-form gradients (dx, dweight, dshift, dscale) of ln_modulate, in float32 or wider."""
    acc = mean.dtype
    dy = dy.to(acc)
    xhat = (x.to(acc) - mean) * rstd  # (B, N, D)
    gs = dy * (1 + scale.to(acc).unsqueeze(1))  # gradient at LN(x) * w
    g = gs * weight.to(acc) if weight is not None else gs
    dx = (g - g.mean(-1, keepdim=True) - xhat * (g * xhat).mean(-1, keepdim=True)) * rstd
    dw = (gs * xhat).sum((0, 1)) if weight is not None else None
    xw = xhat * weight.to(acc) if weight is not None else xhat
    return dx, dw, dy.sum(1), (dy * xw).sum(1)


class _LNModulate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, shift, scale, eps):
        mean, rstd = ln_stats(x, eps)
        acc = mean.dtype
        xhat = (x.to(acc) - mean) * rstd
        if weight is not None:
            xhat = xhat * weight.to(acc)
        out = modulate(xhat, shift.to(acc), scale.to(acc)).to(torch.promote_types(x.dtype, shift.dtype))
        ctx.save_for_backward(x, weight, scale, mean, rstd)
        ctx.dtypes = (x.dtype, shift.dtype, scale.dtype)
        return out

    @staticmethod
    def backward(ctx, dy):
        x, weight, scale, mean, rstd = ctx.saved_tensors
        dx, dw, dshift, dscale = ln_modulate_backward(dy, x, weight, scale, mean, rstd)
        xd, sd, cd = ctx.dtypes
        return (dx.to(xd), None if dw is None else dw.to(weight.dtype), dshift.to(sd), dscale.to(cd), None)


@ln_modulate_op.register("torch", priority=-5)
def ln_modulate_torch(x, weight, shift, scale, eps):
    """One autograd node saving x, mean and 1/std (not LN's output); closed-form backward."""
    check_inputs(x, weight, shift, scale)
    return _LNModulate.apply(x, weight, shift, scale, eps)


# ---------------------------------------------------------------- Triton
def triton_kernels():
    from microdit.kernels import ln_modulate as kernels  # imports triton: only when used

    return kernels


def _out_dtype(x):
    return torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype


@torch.library.custom_op("microdit::triton_ln_modulate", mutates_args=())
def ln_modulate_triton_op(x: torch.Tensor, weight: torch.Tensor | None, shift: torch.Tensor, scale: torch.Tensor,
                          eps: float, out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return triton_kernels().ln_modulate_fwd(x.contiguous(), weight, shift.contiguous(), scale.contiguous(), eps,
                                            out_dtype)


@ln_modulate_triton_op.register_fake
def _(x, weight, shift, scale, eps, out_dtype):
    B, N, _ = x.shape
    return x.new_empty(x.shape, dtype=out_dtype), x.new_empty(B, N, dtype=torch.float32), x.new_empty(B, N, dtype=torch.float32)


@torch.library.custom_op("microdit::triton_ln_modulate_backward", mutates_args=())
def ln_modulate_triton_backward(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None, scale: torch.Tensor,
                                mean: torch.Tensor, rstd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    dx, dw, dshift, dscale = triton_kernels().ln_modulate_bwd(dy.contiguous(), x.contiguous(), weight,
                                                              scale.contiguous(), mean, rstd)
    return dx, dw if dw is not None else dshift.new_empty(0), dshift, dscale


@ln_modulate_triton_backward.register_fake
def _(dy, x, weight, scale, mean, rstd):
    B, _, D = x.shape
    f32 = dict(dtype=torch.float32)
    return (torch.empty_like(x), x.new_empty(D if weight is not None else 0, **f32), x.new_empty(B, D, **f32),
            x.new_empty(B, D, **f32))


def _ln_setup(ctx, inputs, output):
    x, weight, shift, scale, _, _ = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, weight, scale, mean, rstd)
    ctx.shift_dtype = shift.dtype
    ctx.mark_non_differentiable(mean, rstd)


def _ln_backward(ctx, dy, _dmean, _drstd):
    x, weight, scale, mean, rstd = ctx.saved_tensors
    dx, dw, dshift, dscale = ln_modulate_triton_backward(dy, x, weight, scale, mean, rstd)
    return (dx, None if weight is None else dw.to(weight.dtype), dshift.to(ctx.shift_dtype), dscale.to(scale.dtype),
            None, None)


ln_modulate_triton_op.register_autograd(_ln_backward, setup_context=_ln_setup)


def triton_supports(x, *args, **kwargs) -> list[str]:
    reasons = triton_device_reasons(x.device.type)
    if x.shape[-1] > 8192:
        reasons = reasons + [f"D={x.shape[-1]} above 8192 (one row per program)"]
    return reasons


@ln_modulate_op.register("triton", priority=20, available=triton_available_reasons, supports=triton_supports)
def ln_modulate_triton(x, weight, shift, scale, eps):
    check_inputs(x, weight, shift, scale)
    return ln_modulate_triton_op(x, weight, shift, scale, eps, _out_dtype(x))[0]


def ln_modulate(x, weight, shift, scale, eps, backend=None):
    """(B, N, D) -> (B, N, D): LayerNorm(x; weight, no bias) * (1 + scale) + shift."""
    return ln_modulate_op(x, weight, shift, scale, eps, backend=backend)
