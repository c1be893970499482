"""Where a training step's time goes, by category, from torch.profiler.

Scopes (`microdit::attention` around each attention core, `microdit::moe` around each MoE
layer) are pushed in eager mode (`module_scopes`); backward work is mapped to the forward op
that created it through the autograd sequence number, so a backward GEMM of an expert counts as
an expert GEMM. Each profiled op's *self*
time goes to exactly one category, so on the CPU the categories partition the step; on a GPU
they hold kernel time and `idle` is the step time no kernel covered (host-bound gaps). Under
torch.compile the scopes are gone and fused kernels are attributed by their names only.
"""
from __future__ import annotations

import re
from contextlib import contextmanager

import torch
from torch import nn

CATEGORIES = ("attention", "dense_gemm", "expert_gemm", "moe_dispatch_combine", "masking",
              "norm_modulation_elementwise", "optimizer", "other", "idle")
STEP_SCOPE = "microdit::bench_step"

_GEMM = re.compile(r"\b(aten::)?(mm|bmm|addmm|baddbmm|addbmm|matmul|linear|einsum|_scaled_mm|_grouped_mm|conv\w*|"
                   r"convolution\w*)\b|gemm|cutlass|sm\d+_xmma|ampere_|hopper_|cublas|extern_kernels\.mm", re.I)
_GEMM_BACKWARD = re.compile(r"(Mm|Bmm|Addmm|Baddbmm|Linear|Einsum|Convolution|ScaledMm)Backward", re.I)
_ATTENTION = re.compile(r"scaled_dot_product|flash|efficient_attention|_cudnn_attention|fmha|attention", re.I)
_MASKING = re.compile(r"mask_tokens|unmask|keep_indices|token_mask|token_rows|argsort|gather|scatter", re.I)
_MOE = re.compile(r"\bmoe|expert|one_hot|index_add|index_select|topk", re.I)
_OPTIM = re.compile(r"Optimizer\.|_foreach_|microdit::clip_grad_norm|microdit::ema|adamw|_fused_adam", re.I)
_ELEMENTWISE = re.compile(r"norm|mul|add|sub|div|silu|gelu|sigmoid|tanh|exp|log|pow|sqrt|rsqrt|mean|sum|neg|"
                          r"softmax|where|clamp|addcmul|lerp|modulat|fused|triton_(poi|per|red)", re.I)


def _chain(ev):
    """The event and its CPU ancestors, innermost first."""
    out = []
    while ev is not None:
        out.append(ev)
        ev = ev.cpu_parent
    return out


def _scopes(chain) -> set[str]:
    return {e.name for e in chain if e.name.startswith("microdit::")}


def _product_shape(name: str, mats: list[tuple]) -> tuple | None:
    """The result shape of GEMM op `name` from its matrix operands `mats` (2-D and 3-D inputs in
    order), or None when they do not multiply: addmm / baddbmm take their last two (the first is
    the added input), linear x @ W^T, the rest (mm, bmm, matmul, _scaled_mm) their first two."""
    if len(mats) < 2:
        return None
    if name.endswith("linear"):
        x, w = mats[0], mats[1]
        return x[:-1] + (w[0],) if len(w) == 2 and x[-1] == w[1] else None
    a, b = mats[-2:] if re.search(r"add(b)?mm|baddbmm", name) else mats[:2]
    if len(a) == len(b) and a[-1] == b[-2] and a[:-2] == b[:-2]:
        return a[:-1] + b[-1:]
    return None


def _expert_gemm(names, shapes, expert_shapes) -> bool:
    """Whether a GEMM inside an MoE layer multiplies an expert weight or produces one (a weight
    gradient): judged on the GEMM ops' own operands and result along the chain (aten GEMMs and
    microdit's own, e.g. the cuBLASLt expert GEMMs), never on an enclosing call's inputs (the MoE
    function takes the expert weights beside the router's). A 2-D match with one expert's slice
    counts only for _scaled_mm, the FP8 path's per-expert GEMM: a plain 2-D GEMM of that shape in
    an MoE layer is the router's whenever the token count happens to equal d or the hidden size."""
    for name, shp in zip(names, shapes):
        if not (name.startswith(("aten::", "microdit::")) and _GEMM.search(name)) or not shp:
            continue
        mats = [tuple(x) for x in shp if x and len(x) in (2, 3)]
        out = _product_shape(name, mats)
        per_expert = "_scaled_mm" in name
        if any(m in expert_shapes and (len(m) == 3 or per_expert) for m in mats + ([out] if out else [])):
            return True
    return False


def classify(names: list[str], scopes: set[str], expert_shapes: set[tuple]=frozenset(),
             shapes: list=()) -> str:
    """The category of an op with `names` (itself, then its ancestors and, for backward work,
    the forward op's chain), inside module `scopes`, with the input `shapes` along its chain."""
    text = " ".join(names)
    if _OPTIM.search(text):
        return "optimizer"
    gemm = bool(_GEMM.search(names[0]) or _GEMM_BACKWARD.search(text) or
                any(_GEMM.search(n) for n in names if n.startswith("aten::")))
    if "microdit::moe" in scopes or _MOE.search(text):
        return "expert_gemm" if gemm and _expert_gemm(names, shapes, expert_shapes) else "moe_dispatch_combine"
    if "microdit::masking" in scopes or _MASKING.search(text):
        return "masking"
    if "microdit::attention" in scopes or _ATTENTION.search(text):
        # The scope holds the attention core alone (module_scopes), whatever the projections
        # are (nn.Linear, FP8 _scaled_mm, Transformer Engine); a linear or LayerNorm that still
        # lands here (an attention module profiled by hand) is not attention.
        if "aten::linear" not in names and not re.search(r"layer_norm", text):
            return "attention"
    if gemm:
        return "dense_gemm"
    if _ELEMENTWISE.search(text):
        return "norm_modulation_elementwise"
    return "other"


class _ScopedOp:
    """An op of a layer, called inside a profiler scope (module_scopes puts it in place)."""

    def __init__(self, op, scope: str):
        self.op, self.scope = op, scope

    def __call__(self, *args, **kwargs):
        with torch.profiler.record_function(self.scope):
            return self.op(*args, **kwargs)

    def __getattr__(self, name):  # describe(), backend, ... of the op
        if name.startswith("__") or name in ("op", "scope"):  # copy/pickle probes, before __init__
            raise AttributeError(name)
        return getattr(self.op, name)


@contextmanager
def module_scopes(model: nn.Module, masking_fns=()):
    """Profiler scopes (eager mode only): `microdit::attention` around each attention layer's
    core (its `attention` op: SDPA, flash, the reference's matmul-softmax-matmul; not the q/kv/out
    projections, which are GEMMs whatever runs them, FP8 included) and `microdit::moe` around
    each MoE layer (forward hooks)."""
    from ..nn.layers import CrossAttention, ExpertChoiceMoE, SelfAttention

    handles, open_, swapped = [], {}, []

    def enter(name):
        def pre(mod, args):
            rf = torch.profiler.record_function(name)
            rf.__enter__()
            open_.setdefault(id(mod), []).append(rf)
        return pre

    def leave(mod, args, out):
        open_[id(mod)].pop().__exit__(None, None, None)

    for m in model.modules():
        if isinstance(m, ExpertChoiceMoE):
            handles += [m.register_forward_pre_hook(enter("microdit::moe")), m.register_forward_hook(leave)]
        elif isinstance(m, (SelfAttention, CrossAttention)) and "attention" in vars(m):
            swapped.append((m, m.attention))
            m.attention = _ScopedOp(m.attention, "microdit::attention")
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        for m, op in swapped:
            m.attention = op


def expert_weight_shapes(model: nn.Module) -> set[tuple]:
    """Shapes of every expert weight (and its transpose): a GEMM with one of them is an expert GEMM."""
    from ..nn.layers import ExpertChoiceMoE

    shapes = set()
    for m in model.modules():
        if isinstance(m, ExpertChoiceMoE):
            for p in m.parameters():
                if p.dim() == 3:
                    # the batched weight, and one expert's slice (the FP8 path multiplies expert
                    # by expert), each either way round
                    shapes |= {tuple(p.shape), (p.shape[0], p.shape[2], p.shape[1]),
                               tuple(p.shape[1:]), (p.shape[2], p.shape[1])}
    return shapes


def categorize(events, device_type: str, expert_shapes: set[tuple] = frozenset()) -> dict:
    """{"step_ms", "categories_ms": {category: ms}, "share": {category: fraction}} over the
    profiled steps (each inside a `STEP_SCOPE` record_function), per step."""
    roots = [e for e in events if e.name == STEP_SCOPE]
    if not roots:
        raise ValueError(f"no {STEP_SCOPE!r} scope in the profile: profile the step inside it")
    cuda = device_type == "cuda"
    forward_by_seq = {}
    for e in events:  # the outermost forward op of each autograd node (events are in start order)
        seq = getattr(e, "sequence_nr", -1)
        if seq >= 0 and not e.name.startswith("autograd::") and seq not in forward_by_seq:
            forward_by_seq[seq] = e
    totals = dict.fromkeys(CATEGORIES, 0.0)
    step_us = sum(r.cpu_time_total for r in roots)
    for e in events:
        if e.name == STEP_SCOPE:
            if not cuda:
                totals["other"] += e.self_cpu_time_total  # Python between the ops
            continue
        chain = _chain(e)
        if not cuda and chain[-1].name != STEP_SCOPE:
            continue  # outside the measured steps
        t = e.self_device_time_total if cuda else e.self_cpu_time_total
        if t <= 0:
            continue
        names, scopes = [c.name for c in chain], _scopes(chain)
        shapes = [getattr(c, "input_shapes", None) for c in chain]
        # Backward: the node's chain, then the chain of the forward op that created the node.
        bw = next((c for c in chain if c.name.startswith("autograd::engine::evaluate_function")), None)
        if bw is not None and getattr(bw, "sequence_nr", -1) in forward_by_seq:
            fchain = _chain(forward_by_seq[bw.sequence_nr])
            names += [c.name for c in fchain]
            scopes |= _scopes(fchain)
            shapes += [getattr(c, "input_shapes", None) for c in fchain]
        totals[classify(names, scopes, expert_shapes, shapes)] += t
    if cuda:  # what no kernel covered
        totals["idle"] = max(step_us - sum(totals.values()), 0.0)
    n = len(roots)
    ms = {k: v / 1e3 / n for k, v in totals.items()}
    step_ms = step_us / 1e3 / n
    covered = sum(ms.values())
    return {"step_ms": step_ms, "categories_ms": ms,
            "share": {k: v / covered if covered else 0.0 for k, v in ms.items()}}
