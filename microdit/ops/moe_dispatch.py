"""Expert-choice mixture-of-experts feed-forward: routing, dispatch, expert FFNs, combine.

Per sample with T tokens, each of E experts takes the top k = int(capacity * T / E) tokens by
its router probability (softmax over experts); token j's output is the sum over the (expert,
slot) pairs that chose it of prob[j, e] * W2_e(GELU(W1_e x_j)).

The reference backend computes this as the published code does: dispatch and combine are
einsums against a dense one-hot tensor of shape (B, E, k, T), which costs O(T^2 d) per sample.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .registry import Op

moe_op = Op("moe", "expert-choice MoE layer: router top-k, dispatch, expert FFN, combine")


def expert_capacity(num_tokens: int, num_experts: int, capacity: float) -> int:
    """Tokens each expert takes per sample."""
    return int(capacity * num_tokens / num_experts)


def route(x, gate_weight, k):
    """Router probabilities (B, T, E) and each expert's top-k (probs, token indices) (B, E, k)."""
    probs = F.linear(x, gate_weight).softmax(dim=-1)  # (B, T, E)
    gates, idx = torch.topk(probs.transpose(1, 2), k, dim=-1)  # (B, E, k)
    return probs, gates, idx


@moe_op.register("reference", priority=0)
def moe_reference(x, gate_weight, w1, w2, capacity):
    """Published: one-hot dispatch/combine einsums."""
    B, T, d = x.shape
    k = expert_capacity(T, w1.shape[0], capacity)
    _, gates, idx = route(x, gate_weight, k)
    onehot = F.one_hot(idx, num_classes=T).to(x.dtype)  # (B, E, k, T)
    xin = torch.einsum("bekt,btd->bekd", onehot, x)
    h = F.gelu(torch.einsum("bekd,edh->bekh", xin, w1))
    out = torch.einsum("bekh,ehd->bekd", h, w2)
    out = gates.unsqueeze(-1) * out
    return torch.einsum("bekt,bekd->btd", onehot, out)


@moe_op.register("torch", priority=10)
def moe_torch(x, gate_weight, w1, w2, capacity):
    """Index gather, one batched matmul per expert weight over all samples, scatter-add combine."""
    B, T, d = x.shape
    E = w1.shape[0]
    k = expert_capacity(T, E, capacity)
    _, gates, idx = route(x, gate_weight, k)
    flat = idx.reshape(B, E * k)  # (B, E*k)
    rows = torch.arange(B, device=x.device).unsqueeze(1)
    xin = x[rows, flat].view(B, E, k, d).transpose(0, 1).reshape(E, B * k, d)  # (E, B*k, d)
    h = F.gelu(torch.bmm(xin, w1))  # (E, B*k, hidden)
    out = torch.bmm(h, w2).view(E, B, k, d).transpose(0, 1)  # (B, E, k, d)
    out = (out * gates.unsqueeze(-1)).reshape(B, E * k, d)
    y = x.new_zeros(B, T, d)
    return y.index_put_((rows.expand(B, E * k), flat), out, accumulate=True)


def expert_choice_moe(x, gate_weight, w1, w2, capacity: float, backend=None) -> torch.Tensor:
    """(B, T, d) -> (B, T, d). gate_weight (E, d), w1 (E, d, hidden), w2 (E, hidden, d)."""
    return moe_op(x, gate_weight, w1, w2, capacity, backend=backend)
