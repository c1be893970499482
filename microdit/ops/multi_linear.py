"""Several linear maps of the same input: [x @ W_i^T + b_i for each i].

The model applies such sets where every block reads the same tensor: the adaLN modulations of
all blocks from GELU(c), and the caption K/V projections of all blocks from the caption states.
Backends: reference (one GEMM per block, as the published blocks do) and fused (one GEMM over
the concatenated weights, then views of its output). The weights stay each block's own
parameters, so the published state dict loads and saves tensor for tensor. The price is a
copy of all the weights into one per step (and of their gradients out of it): on a CPU, eager,
that measured slower than the separate GEMMs (8 blocks' adaLN from (8, 1024): 3.2 s vs 1.2 s
forward+backward; caption K/V from (8, 77, 1024): 3.8 s vs 2.5 s), so the automatic choice is
reference; fused is chosen explicitly (backends: {multi_linear: fused}) where launches
dominate. Storing the weights concatenated (views for the published names) would remove the
copy; not done yet.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .registry import Op

multi_linear_op = Op("multi_linear", "[x @ W_i^T + b_i]: linear maps of one input (adaLN of all blocks, caption K/V)")


def check_inputs(x, weights, biases):
    if not weights or len(weights) != len(biases):
        raise ValueError(f"multi_linear: need one bias (or None) per weight; got {len(weights)} weights, "
                         f"{len(biases)} biases")
    for i, w in enumerate(weights):
        if w.dim() != 2 or w.shape[1] != x.shape[-1]:
            raise ValueError(f"multi_linear: weight {i} is {tuple(w.shape)}; expected (out, {x.shape[-1]})")
    if len({b is None for b in biases}) > 1:
        raise ValueError("multi_linear: either every map has a bias or none has")


@multi_linear_op.register("reference", priority=0)
def multi_linear_reference(x, weights, biases):
    check_inputs(x, weights, biases)
    return [F.linear(x, w, b) for w, b in zip(weights, biases)]


@multi_linear_op.register("fused", priority=-5)
def multi_linear_fused(x, weights, biases):
    """One GEMM over the concatenated weights; the outputs are views of its result."""
    check_inputs(x, weights, biases)
    if len(weights) == 1:
        return [F.linear(x, weights[0], biases[0])]
    bias = None if biases[0] is None else torch.cat(list(biases))
    out = F.linear(x, torch.cat(list(weights)), bias)  # (..., sum of outs)
    return list(out.split([w.shape[0] for w in weights], dim=-1))


def multi_linear(x, weights, biases, backend=None):
    return multi_linear_op(x, list(weights), list(biases), backend=backend)
