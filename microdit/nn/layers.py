"""Building blocks of MicroDiT. Parameter names follow the published checkpoints."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops.opset import BoundOp, OpSet


def gelu_tanh() -> nn.Module:
    return nn.GELU(approximate="tanh")


def layer_norm(dim: int, eps: float) -> nn.LayerNorm:
    """LayerNorm with a learnable weight and no bias, as every LN of the published model."""
    return nn.LayerNorm(dim, eps=eps, bias=False)


def round_up(x: int, multiple: int) -> int:
    return multiple * ((x + multiple - 1) // multiple)


def swiglu_hidden(dim: int, ratio: float, multiple_of: int) -> int:
    """Hidden width of a SwiGLU FFN: int(2/3 * int(d * ratio)) rounded up to `multiple_of`."""
    return round_up(int(2 * int(dim * ratio) / 3), multiple_of)


def moe_hidden(dim: int, ratio: float, multiple_of: int) -> int:
    """Hidden width of one expert: int(d * ratio) rounded up to `multiple_of`."""
    return round_up(int(dim * ratio), multiple_of)


def attention_width(dim: int, ratio: float, head_dim: int) -> int:
    """Self-attention width under layer-wise scaling: a multiple of 2 * head_dim."""
    if ratio == 1.0:
        return dim
    return 2 * head_dim * math.ceil(int(dim * ratio) / (2 * head_dim))


def modulate(x, shift, scale):
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class PatchEmbed(nn.Module):
    """Conv2d patchify: (B, C, H, W) -> (B, T, D), tokens in row-major order."""

    def __init__(self, patch_size: int, in_channels: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size, bias=True)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, T, D)


def timestep_features(t: torch.Tensor, dim: int = 512, max_period: float = 10000.0) -> torch.Tensor:
    """[cos(t f), sin(t f)] with f_i = exp(-ln(max_period) i / (dim/2))."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepEmbedder(nn.Module):
    """c_noise (B,) -> (B, D) through 512 sinusoidal features and a 2-layer MLP."""

    def __init__(self, dim: int, freq_dim: int = 512):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), gelu_tanh(), nn.Linear(dim, dim))

    def forward(self, t):
        return self.mlp(timestep_features(t, self.freq_dim).to(self.mlp[0].weight.dtype))


class ProjectionMLP(nn.Module):
    """Linear -> GELU-tanh -> LN -> Linear (caption projection, pooled-caption MLP)."""

    def __init__(self, in_dim: int, dim: int, eps: float):
        super().__init__()
        self.fc1 = nn.Linear(in_dim, dim)
        self.act = gelu_tanh()
        self.norm = layer_norm(dim, eps)
        self.fc2 = nn.Linear(dim, dim)

    def forward(self, x):
        return self.fc2(self.norm(self.act(self.fc1(x))))


class CaptionEmbedder(nn.Module):
    def __init__(self, in_dim: int, dim: int, eps: float):
        super().__init__()
        self.y_proj = ProjectionMLP(in_dim, dim, eps)

    def forward(self, y):
        return self.y_proj(y)


def bound_op(ops: OpSet | None, name: str) -> BoundOp:
    """Op `name` of `ops` (the model's, built once by ops.opset.build_ops), or, for a layer built
    on its own, that op with its backend chosen automatically at each call."""
    return ops[name] if ops is not None else BoundOp(name)


class SelfAttention(nn.Module):
    """Fused qkv, LN0 on q and k over all heads together, attention, output projection."""

    def __init__(self, dim: int, width: int, head_dim: int, eps: float, bias: bool, ops: OpSet | None = None):
        super().__init__()
        self.width, self.heads = width, width // head_dim
        self.qkv = nn.Linear(dim, 3 * width, bias=bias)
        self.q_norm = nn.LayerNorm(width, eps=eps, elementwise_affine=False)
        self.k_norm = nn.LayerNorm(width, eps=eps, elementwise_affine=False)
        self.proj = nn.Linear(width, dim, bias=bias)
        self.attention = bound_op(ops, "attention")
        self.qk_norm = bound_op(ops, "qk_norm")  # q_norm and k_norm's LN0, in the layout and dtype attention takes

    def forward(self, x):
        B, N, _ = x.shape
        q, k, v = self.qkv(x).split(self.width, dim=-1)  # 3 x (B, N, h), views of one GEMM output
        q = self.qk_norm(q, self.heads, self.q_norm.eps)  # (B, N, H, hd)
        k = self.qk_norm(k, self.heads, self.k_norm.eps)  # (B, N, H, hd)
        o = self.attention(q, k, v.view(B, N, self.heads, -1))  # (B, N, H, hd), no transposes
        return self.proj(o.reshape(B, N, self.width))  # (B, N, d)

    def extra_repr(self):
        return f"heads={self.heads}, attention={self.attention.describe()}, qk_norm={self.qk_norm.describe()}"


class CrossAttention(nn.Module):
    """Queries from image tokens, keys and values (k first) from caption tokens."""

    def __init__(self, dim: int, width: int, head_dim: int, eps: float, bias: bool, ops: OpSet | None = None):
        super().__init__()
        self.width, self.heads = width, width // head_dim
        self.q_linear = nn.Linear(dim, width, bias=bias)
        self.kv_linear = nn.Linear(dim, 2 * width, bias=bias)
        self.q_norm = nn.LayerNorm(width, eps=eps, elementwise_affine=False)
        self.k_norm = nn.LayerNorm(width, eps=eps, elementwise_affine=False)
        self.proj = nn.Linear(width, dim, bias=bias)
        self.attention = bound_op(ops, "attention")
        self.qk_norm = bound_op(ops, "qk_norm")

    def forward(self, x, y, kv=None):
        """`kv` (B, L, 2h): kv_linear(y) when the model computed it already (all blocks in one GEMM)."""
        B, N, _ = x.shape
        L = y.shape[1]
        q = self.qk_norm(self.q_linear(x), self.heads, self.q_norm.eps)  # (B, N, H, hd)
        k, v = (self.kv_linear(y) if kv is None else kv).split(self.width, dim=-1)  # 2 x (B, L, h)
        k = self.qk_norm(k, self.heads, self.k_norm.eps)  # (B, L, H, hd)
        o = self.attention(q, k, v.view(B, L, self.heads, -1))  # (B, N, H, hd)
        return self.proj(o.reshape(B, N, self.width))  # (B, N, d)

    def extra_repr(self):
        return f"heads={self.heads}, attention={self.attention.describe()}, qk_norm={self.qk_norm.describe()}"


class SwiGLU(nn.Module):
    """W3(silu(W1 x) * W2 x)."""

    def __init__(self, dim: int, hidden: int, bias: bool, ops: OpSet | None = None):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=bias)
        self.w2 = nn.Linear(dim, hidden, bias=bias)
        self.w3 = nn.Linear(hidden, dim, bias=bias)
        self.swiglu = bound_op(ops, "swiglu")

    def forward(self, x):
        if not all(type(m) is nn.Linear for m in (self.w1, self.w2, self.w3)):
            # Linears replaced by FP8 ones (microdit.fp8) run as modules, each its own GEMM.
            return self.w3(F.silu(self.w1(x)) * self.w2(x))
        return self.swiglu(x, self.w1.weight, self.w2.weight, self.w3.weight, self.w1.bias, self.w2.bias,
                           self.w3.bias)

    def extra_repr(self):
        return f"swiglu={self.swiglu.describe()}"


class ExpertChoiceMoE(nn.Module):
    """Expert-choice MoE FFN through the `moe` op of `ops` (see bound_op)."""

    def __init__(self, dim: int, hidden: int, num_experts: int, capacity: float, ops: OpSet | None = None):
        super().__init__()
        self.capacity = capacity
        self.gate = nn.Linear(dim, num_experts, bias=False)
        self.w1 = nn.Parameter(torch.empty(num_experts, dim, hidden))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden, dim))
        self.moe = bound_op(ops, "moe")

    def forward(self, x):
        return self.moe(x, self.gate.weight, self.w1, self.w2, self.capacity)

    def extra_repr(self):
        E, d, h = self.w1.shape
        return f"experts={E}, dim={d}, hidden={h}, capacity={self.capacity}, backend={self.moe.describe()}"
