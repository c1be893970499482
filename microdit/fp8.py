"""FP8 training of the block GEMMs: `convert(model, backend=, recipe=)`, in place.

What runs in FP8: in every mixer and backbone `Block`, the self-attention qkv and proj, the
cross-attention q, kv and proj, the SwiGLU W1, W2, W3 and the experts' W1, W2. What stays in
high precision: the adaLN modulations, the embedders, the caption refinement, the final layer and
the MoE router (its softmax picks tokens: FP8 noise there changes which tokens an expert takes).
Master weights stay what they are (fp32 or bf16); every GEMM quantizes its operands on the fly.

Backends (one `fp8_linear` op, listed by `microdit info`):
- torch: torch._scaled_mm (runs on the CPU and on CUDA sm89+). The forward is
  x_e4m3 @ w_e4m3; the backward is two more _scaled_mm calls, dX = dY_g @ W_e4m3 and
  dW = dY_g^T @ X_e4m3, with dY_g in e5m2 (tensorwise, delayed) or e4m3 (rowwise, as torchao's
  rowwise recipe). The high-precision x and w are saved and re-quantized in the backward (the
  rowwise recipe needs them scaled along the other axis).
- emulated: the same quantization, then an ordinary matmul of the dequantized values. FP8
  products are exact in float32, so this computes the same numbers as `torch` up to the
  float32 summation order; it exists because torch's CPU _scaled_mm is a slow reference loop
  (about 10M multiply-adds/s), too slow for a CPU training run of any length.
- torchao: torchao.float8.convert_to_float8_training (CUDA sm89+).
- transformer_engine: te.Linear in `te.fp8_autocast` (CUDA sm89+); with attention backend
  transformer_engine, the recipe also sets fp8_dpa (FP8 attention).
Recipes: tensorwise (one scale per tensor from its current amax), rowwise (one scale per row of
each operand along the contraction), delayed (tensorwise, the scale from the largest amax of
the last `history` steps, as Transformer Engine's DelayedScaling).

Checkpoints: with every backend, `model.state_dict()` is the published format, loadable by a
bf16 model and back. Ours keep the published parameter names (an Fp8Linear is an nn.Linear) and
their scaling state in non-persistent buffers; the libraries' modules are held to nn.Linear's
entries by `keep_published_format` (Transformer Engine's `_extra_state` is left out).
`scaling_state(model)` / `load_scaling_state` carry all the scaling state (amax histories,
Transformer Engine's extra state) beside it; the trainer saves it as `fp8_scaling`.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import availability
from .nn.layers import ExpertChoiceMoE
from .ops import moe
from .ops.registry import Op

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
FP8_MAX = {E4M3: 448.0, E5M2: 57344.0}
RECIPES = ("tensorwise", "rowwise", "delayed")
HISTORY = 16  # delayed scaling: amax history length (Transformer Engine's default is 1024 steps)

fp8_op = Op("fp8_linear", "block linears and expert GEMMs in FP8 (microdit.fp8.convert)")


def recipe_dtypes(recipe: str) -> tuple[torch.dtype, torch.dtype]:
    """(forward operands, gradient) FP8 dtypes of a recipe."""
    return (E4M3, E4M3) if recipe == "rowwise" else (E4M3, E5M2)


# ---------------------------------------------------------------- quantization and the GEMM
def amax_of(t: torch.Tensor, dim: int | None) -> torch.Tensor:
    """max |t| over everything (dim None) or along `dim` (kept), in float32."""
    a = t.detach().abs().float()
    return a.amax() if dim is None else a.amax(dim=dim, keepdim=True)


def quantize(t: torch.Tensor, dtype: torch.dtype, amax: torch.Tensor):
    """(t * s) in `dtype` with s = fp8_max / amax, saturated; returns (t_fp8, 1/s) for _scaled_mm."""
    scale = FP8_MAX[dtype] / amax.clamp_min(1e-12)
    q = (t.float() * scale).clamp_(-FP8_MAX[dtype], FP8_MAX[dtype]).to(dtype)
    return q, scale.reciprocal()


def _pad_to(t: torch.Tensor, dim: int, multiple: int) -> torch.Tensor:
    extra = -t.shape[dim] % multiple
    if not extra:
        return t
    pad = [0, 0] * (t.dim() - 1 - dim % t.dim()) + [0, extra]
    return F.pad(t, pad)


def scaled_mm(a, b, a_dtype, b_dtype, out_dtype, rowwise, amax_a=None, amax_b=None, emulate=False):
    """a (M, K) @ b (K, N) with both operands quantized to FP8: torch._scaled_mm, or (emulate)
    the dequantized matmul of the same FP8 values. `amax_*` override the current amax (delayed
    scaling); rowwise scales each row of a and each column of b (along the contraction K)."""
    if a.device.type == "cuda":
        # cuBLASLt FP8 needs the contraction (and N) in multiples of 16: zero padding adds nothing.
        a, b = _pad_to(a, 1, 16), _pad_to(b, 0, 16)
    aq, sa = quantize(a, a_dtype, amax_of(a, 1 if rowwise else None) if amax_a is None else amax_a)
    bq, sb = quantize(b, b_dtype, amax_of(b, 0 if rowwise else None) if amax_b is None else amax_b)
    if emulate:
        return ((aq.float() * sa) @ (bq.float() * sb)).to(out_dtype)
    # _scaled_mm takes a row-major first operand and a column-major second one.
    return torch._scaled_mm(aq.contiguous(), bq.t().contiguous().t(), scale_a=sa, scale_b=sb,
                            out_dtype=out_dtype)


def _delayed_amax(hist: torch.Tensor, current: torch.Tensor) -> torch.Tensor:
    """The largest amax of the history (the current one while the history is empty); records current."""
    past = hist.amax()
    used = torch.where(past > 0, past, current)
    hist.copy_(torch.cat([current.reshape(1), hist[:-1]]))
    return used


class _Fp8Matmul(torch.autograd.Function):
    """y = x @ w^T with x (M, K), w (N, K): one FP8 GEMM forward, two backward."""

    @staticmethod
    def forward(ctx, x, w, recipe, emulate, hist, out_dtype):
        fwd, grad = recipe_dtypes(recipe)
        rowwise = recipe == "rowwise"
        ax = aw = None
        if recipe == "delayed":
            ax = _delayed_amax(hist[0], amax_of(x, None))
            aw = _delayed_amax(hist[1], amax_of(w, None))
        ctx.save_for_backward(x, w)
        ctx.cfg = (recipe, emulate, hist, fwd, grad, rowwise)
        return scaled_mm(x, w.t(), fwd, fwd, out_dtype, rowwise, ax, aw, emulate)[: x.shape[0], : w.shape[0]]

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        recipe, emulate, hist, fwd, grad, rowwise = ctx.cfg
        ag = _delayed_amax(hist[2], amax_of(g, None)) if recipe == "delayed" else None
        gx = gw = None
        if ctx.needs_input_grad[0]:
            gx = scaled_mm(g, w, grad, fwd, x.dtype, rowwise, ag, None, emulate)[: g.shape[0], : w.shape[1]]
        if ctx.needs_input_grad[1]:
            gw = scaled_mm(g.t(), x, grad, fwd, w.dtype, rowwise, ag, None, emulate)[: g.shape[1], : x.shape[1]]
        return gx, gw, None, None, None, None


def out_dtype_of(x: torch.Tensor) -> torch.dtype:
    """Autocast's dtype where autocast is on (as F.linear would return), else the input's."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def fp8_matmul(x, w, recipe="tensorwise", emulate=False, hist=None, out_dtype=None):
    """x (..., K) @ w (N, K)^T in FP8; `hist` (3, HISTORY) amax histories for the delayed recipe."""
    if recipe not in RECIPES:
        raise ValueError(f"fp8 recipe {recipe!r} unknown (recipes: {', '.join(RECIPES)})")
    if recipe == "delayed" and hist is None:
        raise ValueError("the delayed fp8 recipe needs an amax history (hist)")
    out_dtype = out_dtype or out_dtype_of(x)
    y = _Fp8Matmul.apply(x.reshape(-1, x.shape[-1]), w, recipe, emulate, hist, out_dtype)
    return y.view(*x.shape[:-1], w.shape[0])


# ---------------------------------------------------------------- modules
class Fp8Linear(nn.Linear):
    """nn.Linear whose GEMMs run in FP8 (same parameters and state dict as nn.Linear)."""

    def __init__(self, in_features, out_features, bias=True, recipe="tensorwise", emulate=False,
                 device=None, dtype=None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.recipe, self.emulate = recipe, emulate
        # Scaling state: not part of the published state dict (see scaling_state).
        self.register_buffer("amax_history", torch.zeros(3, HISTORY, device=device), persistent=False)

    @classmethod
    def from_linear(cls, lin: nn.Linear, recipe: str, emulate: bool) -> "Fp8Linear":
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = lin.in_features, lin.out_features
        new.weight, new.bias = lin.weight, lin.bias  # the same Parameters: optimizers keep working
        new.recipe, new.emulate = recipe, emulate
        new.register_buffer("amax_history", torch.zeros(3, HISTORY, device=lin.weight.device), persistent=False)
        return new

    def forward(self, x):
        y = fp8_matmul(x, self.weight, self.recipe, self.emulate, self.amax_history)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self):
        return super().extra_repr() + f", fp8={self.recipe}{' (emulated)' if self.emulate else ''}"


class Fp8ExpertChoiceMoE(ExpertChoiceMoE):
    """Expert-choice MoE with the expert GEMMs in FP8 (routing as the torch backend, router kept
    in high precision); one FP8 GEMM per expert and weight."""

    @classmethod
    def from_moe(cls, moe: ExpertChoiceMoE, recipe: str, emulate: bool) -> "Fp8ExpertChoiceMoE":
        moe.__class__ = cls
        moe.recipe, moe.emulate = recipe, emulate
        E = moe.w1.shape[0]
        moe.register_buffer("amax_history", torch.zeros(2, E, 3, HISTORY, device=moe.w1.device), persistent=False)
        return moe

    def experts(self, xin, w1, w2):
        """(E, M, d) -> (E, M, d) with FP8 GEMMs; w1 (E, d, h) and w2 (E, h, d) as stored."""
        mm = lambda x, w, i, e: fp8_matmul(x, w.t(), self.recipe, self.emulate, self.amax_history[i, e])
        return torch.stack([mm(F.gelu(mm(xin[e], w1[e], 0, e)), w2[e], 1, e) for e in range(xin.shape[0])])

    def forward(self, x):
        return moe.moe_torch(x, self.gate.weight, self.w1, self.w2, self.capacity, experts=self.experts)

    def extra_repr(self):
        return super().extra_repr() + f", fp8={self.recipe}{' (emulated)' if self.emulate else ''}"


# ---------------------------------------------------------------- conversion
def block_linears(model: nn.Module):
    """(parent, attribute name, Linear) of every block GEMM that runs in FP8."""
    from .models.microdit import Block

    for block in model.modules():
        if not isinstance(block, Block):
            continue
        for parent in (block.attn, block.cross_attn, block.mlp):
            for name, child in parent.named_children():
                if type(child) is nn.Linear and not (isinstance(parent, ExpertChoiceMoE) and name == "gate"):
                    yield parent, name, child


# ---------------------------------------------------------------- the published format
# A library FP8 linear (te.Linear, torchao's Float8Linear) replaces an nn.Linear whose published
# state dict entries are `weight` and `bias`. Whatever else the library saves (Transformer
# Engine's `_extra_state`: its amax histories and scales; any persistent scaling buffer) is FP8
# scaling state: `state_dict()` leaves it out, `load_state_dict` does not ask for it, and
# `scaling_state` / `load_scaling_state` carry it beside the published-format state dict.
PUBLISHED_LINEAR = ("weight", "bias")


def _drop_scaling_entries(module, state_dict, prefix, local_metadata):
    for k in [k for k in state_dict if k.startswith(prefix) and k[len(prefix):] not in PUBLISHED_LINEAR]:
        del state_dict[k]


def _note_prefix(module, state_dict, prefix, *args):
    module._fp8_load_prefix = prefix


def _forgive_missing_scaling(module, incompatible):
    prefix = module._fp8_load_prefix
    incompatible.missing_keys[:] = [k for k in incompatible.missing_keys if not (
        k.startswith(prefix) and k[len(prefix):] not in PUBLISHED_LINEAR)]


def keep_published_format(module: nn.Module) -> nn.Module:
    """Make `module` (an FP8 stand-in for an nn.Linear) save and load exactly nn.Linear's state
    dict entries; its scaling state goes through `scaling_state` instead."""
    if getattr(module, "_fp8_published_format", False):
        return module
    module._fp8_published_format = True
    module.register_state_dict_post_hook(_drop_scaling_entries)
    module.register_load_state_dict_pre_hook(_note_prefix)
    module.register_load_state_dict_post_hook(_forgive_missing_scaling)
    return module


def replace_block_linears(model: nn.Module, make) -> nn.Module:
    """Put `make(linear)` in place of every block linear, in the published format."""
    for parent, name, lin in list(block_linears(model)):
        setattr(parent, name, keep_published_format(make(lin)))
    return model


def _has_extra_state(m: nn.Module) -> bool:
    return type(m).get_extra_state is not nn.Module.get_extra_state


def _library_scaling_state(m: nn.Module) -> dict:
    """A published-format module's own scaling state: its extra state and persistent buffers."""
    state = {b: t.detach().clone() for b, t in m.named_buffers(recurse=False)
             if b not in m._non_persistent_buffers_set}
    if _has_extra_state(m):
        extra = m.get_extra_state()
        if hasattr(extra, "getvalue"):  # older Transformer Engine: a BytesIO; kept as bytes in a tensor
            extra = torch.frombuffer(bytearray(extra.getvalue()), dtype=torch.uint8)
        state["_extra_state"] = extra
    return state


def _check_recipe(recipe):
    if recipe not in RECIPES:
        raise ValueError(f"fp8 recipe {recipe!r} unknown (recipes: {', '.join(RECIPES)})")


def _convert_torch(model, recipe, emulate=False):
    _check_recipe(recipe)
    for parent, name, lin in list(block_linears(model)):
        setattr(parent, name, Fp8Linear.from_linear(lin, recipe, emulate))
    return _experts_to_fp8(model, recipe, emulate)


def _experts_to_fp8(model, recipe, emulate=False):
    """Every MoE layer's expert GEMMs through torch._scaled_mm (the libraries' FP8 linears do
    not cover a per-expert batched GEMM; the tensorwise recipe here is torchao's own, bit for bit)."""
    for m in list(model.modules()):
        if type(m) is ExpertChoiceMoE:
            Fp8ExpertChoiceMoE.from_moe(m, recipe, emulate)
    return model


def _fp8_gpu_library_reasons(lib_reasons):
    def reasons():  # the library's own reasons (they include a missing GPU), else the GPU's lack of FP8
        return lib_reasons() or availability.fp8_gpu_reasons()
    return reasons


@fp8_op.register("torch", priority=20, available=availability.scaled_mm_reasons)
def convert_torch(model, recipe):
    """Block GEMMs through torch._scaled_mm."""
    return _convert_torch(model, recipe)


@fp8_op.register("emulated", priority=10, available=availability.scaled_mm_reasons)
def convert_emulated(model, recipe):
    """The torch backend's FP8 values, multiplied by an ordinary float32 matmul (fast on CPUs)."""
    return _convert_torch(model, recipe, emulate=True)


TORCHAO_RECIPES = {"tensorwise": "tensorwise", "rowwise": "rowwise"}


@fp8_op.register("torchao", priority=5, available=availability.torchao_float8_reasons)
def convert_torchao(model, recipe):
    """torchao float8 training on the block linears (its Float8Linear is an nn.Linear: same state
    dict); the expert GEMMs in FP8 through torch._scaled_mm with the same recipe (torchao's
    grouped FP8 GEMM is not used)."""
    _check_recipe(recipe)
    if recipe not in TORCHAO_RECIPES:
        raise ValueError(f"fp8 backend torchao has no {recipe!r} recipe (it has: {', '.join(TORCHAO_RECIPES)})")
    ao = availability.torchao_float8()
    config = ao.Float8LinearConfig.from_recipe_name(TORCHAO_RECIPES[recipe])
    slots = [(parent, name) for parent, name, _ in block_linears(model)]
    chosen = {id(getattr(parent, name)) for parent, name in slots}
    ao.convert_to_float8_training(model, config=config, module_filter_fn=lambda m, fqn: id(m) in chosen)
    for parent, name in slots:  # whatever state a torchao version adds stays beside the published format
        keep_published_format(getattr(parent, name))
    return _experts_to_fp8(model, recipe)


@fp8_op.register("transformer_engine", priority=5,
                 available=_fp8_gpu_library_reasons(availability.transformer_engine_reasons))
def convert_transformer_engine(model, recipe):
    """te.Linear for the block linears, run inside te.fp8_autocast (see `autocast`); the expert
    GEMMs in FP8 through torch._scaled_mm with the same recipe (te.GroupedLinear is not used)."""
    _check_recipe(recipe)
    te = availability.transformer_engine()

    def make(lin):
        new = te.Linear(lin.in_features, lin.out_features, bias=lin.bias is not None,
                        params_dtype=lin.weight.dtype, device=lin.weight.device)
        with torch.no_grad():
            new.weight.copy_(lin.weight)
            if lin.bias is not None:
                new.bias.copy_(lin.bias)
        return new

    replace_block_linears(model, make)
    _experts_to_fp8(model, recipe)
    model._fp8_te_recipe = recipe
    return model


def convert(model: nn.Module, backend: str | None = "auto", recipe: str = "tensorwise") -> nn.Module:
    """Put the block GEMMs of `model` in FP8, in place; returns the model."""
    _check_recipe(recipe)
    fp8_op.warm()
    name = fp8_op.resolve(backend) or fp8_op.default()
    return fp8_op.impls[name].fn(model, recipe)


def autocast(model: nn.Module, fp8_attention: bool = False):
    """The context the forward runs in: te.fp8_autocast for Transformer Engine models (with
    fp8_dpa for FP8 attention), else nothing (the other backends quantize inside each GEMM)."""
    import contextlib

    recipe = getattr(model, "_fp8_te_recipe", None)
    if recipe is None:
        return contextlib.nullcontext()
    te = availability.transformer_engine()
    from transformer_engine.common import recipe as te_recipe  # present wherever te imported

    if recipe == "delayed":
        r = te_recipe.DelayedScaling(fp8_dpa=fp8_attention, fp8_mha=False)
    elif recipe == "rowwise":
        r = te_recipe.Float8BlockScaling() if hasattr(te_recipe, "Float8BlockScaling") else te_recipe.DelayedScaling()
    else:
        r = te_recipe.Float8CurrentScaling(fp8_dpa=fp8_attention) if hasattr(te_recipe, "Float8CurrentScaling") \
            else te_recipe.DelayedScaling(fp8_dpa=fp8_attention)
    return te.fp8_autocast(enabled=True, fp8_recipe=r)


def fp8_modules(model: nn.Module):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (Fp8Linear, Fp8ExpertChoiceMoE))]


def scaling_state(model: nn.Module) -> dict:
    """The FP8 scaling state, keyed by module name: our amax histories and the libraries' own
    state (Transformer Engine's `_extra_state`); kept beside the published-format state dict."""
    state = {f"{n}.amax_history": m.amax_history.detach().clone() for n, m in fp8_modules(model)}
    for n, m in model.named_modules():
        if getattr(m, "_fp8_published_format", False):
            state.update({f"{n}.{k}": v for k, v in _library_scaling_state(m).items()})
    return state


def load_scaling_state(model: nn.Module, state: dict) -> None:
    own = {f"{n}.amax_history": (m, "amax_history") for n, m in fp8_modules(model)}
    for n, m in model.named_modules():
        if getattr(m, "_fp8_published_format", False):
            own.update({f"{n}.{k}": (m, k) for k in _library_scaling_state(m)})
    missing, unknown = set(own) - set(state), set(state) - set(own)
    if missing or unknown:
        raise KeyError(f"fp8 scaling state does not match the model: missing {sorted(missing)[:3]}, "
                       f"unknown {sorted(unknown)[:3]}")
    with torch.no_grad():
        for k, (m, attr) in own.items():
            if attr == "_extra_state":
                m.set_extra_state(state[k])
            else:
                getattr(m, attr).copy_(state[k])
