"""FP8 training (microdit.fp8): each FP8 GEMM within FP8 error of float64, the model conversion,
the published state dict, _scaled_mm really used by a training step, and FP8 training matching fp32.

The FP8 error rule (a bound, not a statistical tolerance). Quantizing a value v to an FP8 format
with scale s (v * s is what is rounded) errs by at most u |v| + d / s, with u the unit roundoff
(2^-4 for e4m3, 2^-3 for e5m2) and d half the smallest subnormal (2^-10, 2^-17). With the
elementwise bounds e_a, e_b of the operands of a @ b, every output element obeys
    |fp8(a @ b) - a @ b| <= (e_a @ (|b| + e_b) + |a| @ e_b) * (1 + 1e-5) + 1e-6 * (|a| @ |b|),
the last term for float32 accumulation. The tests check it for the forward and both gradients.
"""
import copy
import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import microdit
from microdit import fp8
from microdit.models.microdit import MicroDiT
from microdit.models.presets import preset_config
from microdit.nn.layers import ExpertChoiceMoE
from microdit.ops.registry import BackendError

U = {fp8.E4M3: 2.0**-4, fp8.E5M2: 2.0**-3}
HALF_SUBNORMAL = {fp8.E4M3: 2.0**-10, fp8.E5M2: 2.0**-17}


def operand_bound(t, dtype, dim):
    """Elementwise bound on the quantization error of t scaled along `dim` (None: tensorwise)."""
    a = t.abs()
    amax = a.amax() if dim is None else a.amax(dim=dim, keepdim=True)
    return U[dtype] * a + HALF_SUBNORMAL[dtype] * amax / fp8.FP8_MAX[dtype]


def gemm_bound(a, b, da, db, rowwise):
    ea, eb = operand_bound(a, da, 1 if rowwise else None), operand_bound(b, db, 0 if rowwise else None)
    return (ea @ (b.abs() + eb) + a.abs() @ eb) * (1 + 1e-5) + 1e-6 * (a.abs() @ b.abs())


def check_within(out, ref, bound, what):
    excess = (out.double() - ref).abs() - bound
    assert excess.max().item() <= 0, f"{what}: exceeds the FP8 error bound by {excess.max().item():.3g}"


@pytest.mark.parametrize("emulate", [False, True], ids=["scaled_mm", "emulated"])
@pytest.mark.parametrize("recipe", fp8.RECIPES)
@pytest.mark.parametrize("shape", [(37, 48, 24), (5, 77, 123), (64, 64, 96)], ids=str)
def test_fp8_matmul_within_fp8_error(shape, recipe, emulate):
    M, K, N = shape
    g = torch.Generator().manual_seed(M * K + N)
    x = (torch.randn(M, K, generator=g) * torch.rand(M, 1, generator=g) * 3).requires_grad_()
    w = (torch.randn(N, K, generator=g) * K**-0.5).requires_grad_()
    dy = torch.randn(M, N, generator=g)
    hist = torch.zeros(3, fp8.HISTORY)
    y = fp8.fp8_matmul(x, w, recipe, emulate, hist)
    dx, dw = torch.autograd.grad(y, (x, w), dy)
    x64, w64, dy64 = x.detach().double(), w.detach().double(), dy.double()
    fwd, grad = fp8.recipe_dtypes(recipe)
    rowwise = recipe == "rowwise"
    check_within(y, x64 @ w64.T, gemm_bound(x64, w64.T, fwd, fwd, rowwise), "forward")
    check_within(dx, dy64 @ w64, gemm_bound(dy64, w64, grad, fwd, rowwise), "dx")
    check_within(dw, dy64.T @ x64, gemm_bound(dy64.T, x64, grad, fwd, rowwise), "dw")
    # And it is really FP8: the error is far above float32 rounding.
    assert (y.double() - x64 @ w64.T).abs().max() > 1e-3 * (x64 @ w64.T).abs().max()
    if recipe == "delayed":  # the history recorded this step's amax of x, w and dy
        assert torch.allclose(hist[:, 0], torch.stack([x.abs().max(), w.abs().max(), dy.abs().max()]))


def test_emulated_equals_scaled_mm():
    """Same FP8 values, float32 products exact: equal up to float32 summation order."""
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(33, 64, generator=g, requires_grad=True), torch.randn(40, 64, generator=g, requires_grad=True)
    dy = torch.randn(33, 40, generator=g)
    outs = []
    for emulate in (False, True):
        y = fp8.fp8_matmul(x, w, "tensorwise", emulate)
        outs.append((y, *torch.autograd.grad(y, (x, w), dy)))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_delayed_scaling_uses_the_history():
    """After a step with a large amax, the next step's scale still covers it (values saturate less)."""
    hist = torch.zeros(3, fp8.HISTORY)
    w = torch.randn(8, 16)
    fp8.fp8_matmul(torch.randn(4, 16) * 100, w, "delayed", hist=hist)
    small = torch.randn(4, 16)
    y_delayed = fp8.fp8_matmul(small, w, "delayed", hist=hist)
    y_current = fp8.fp8_matmul(small, w, "tensorwise")
    assert hist[0, 1] > 50 and not torch.equal(y_delayed, y_current)


def small_model(**kw):
    cfg = preset_config("MicroDiT_Test_2", **kw)
    return MicroDiT(cfg).initialize_weights()


def test_convert_puts_exactly_the_block_gemms_in_fp8():
    model = fp8.convert(small_model(), backend="torch")
    fp8_names = {n for n, m in model.named_modules() if isinstance(m, fp8.Fp8Linear)}
    for n in fp8_names:
        assert n.startswith(("blocks.", "patch_mixer.")) and n.split(".")[-1] in (
            "qkv", "proj", "q_linear", "kv_linear", "w1", "w2", "w3"), n
    moes = [m for m in model.modules() if isinstance(m, ExpertChoiceMoE)]
    assert moes and all(isinstance(m, fp8.Fp8ExpertChoiceMoE) for m in moes)
    for n, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and n not in fp8_names:
            assert type(m) is torch.nn.Linear
            assert ("adaLN" in n or "embedder" in n or "final_layer" in n or "y_emb" in n
                    or "pooled" in n or n.endswith("gate") or "map" in n), n
    n_lin = sum(1 for b in list(model.blocks) + list(model.patch_mixer) for _ in
                [b.attn.qkv, b.attn.proj, b.cross_attn.q_linear, b.cross_attn.kv_linear, b.cross_attn.proj])
    assert len(fp8_names) >= n_lin


def test_convert_bad_input():
    with pytest.raises(ValueError, match="recipe"):
        fp8.convert(small_model(), backend="torch", recipe="blockwise")
    with pytest.raises(BackendError, match="transformer_engine"):
        fp8.convert(small_model(), backend="transformer_engine")
    from microdit import availability

    if availability.torchao_float8_reasons():  # not installed (or no FP8 GEMM here): refused, naming it
        with pytest.raises(BackendError, match="torchao"):
            fp8.convert(small_model(), backend="torchao")
    else:  # installed: its recipes are tensorwise and rowwise only
        with pytest.raises(ValueError, match="torchao has no 'delayed'"):
            fp8.convert(small_model(), backend="torchao", recipe="delayed")


def test_state_dict_is_the_published_format_both_ways():
    ref = small_model()
    model = fp8.convert(copy.deepcopy(ref), backend="torch", recipe="delayed")
    sd = model.state_dict()
    assert list(sd) == list(ref.state_dict())
    for k, v in ref.state_dict().items():
        assert torch.equal(sd[k], v), k
    plain = small_model()
    plain.load_state_dict(sd, strict=True)  # an FP8 run's weights in a bf16/fp32 model
    back = fp8.convert(small_model(), backend="torch", recipe="delayed")
    back.load_state_dict(plain.state_dict(), strict=True)
    scaling = fp8.scaling_state(model)
    assert scaling and all(k.endswith("amax_history") for k in scaling)
    fp8.load_scaling_state(back, {k: v + 1 for k, v in scaling.items()})
    assert all(torch.equal(v, scaling[k] + 1) for k, v in fp8.scaling_state(back).items())
    with pytest.raises(KeyError, match="missing"):
        fp8.load_scaling_state(back, {})


class FakeTELinear(torch.nn.Module):
    """Stands in for te.Linear: the linear's weight and bias, a persistent scale buffer and an
    amax history saved as `_extra_state` (get_extra_state / set_extra_state), as TE does."""

    def __init__(self, lin):
        super().__init__()
        self.weight, self.bias = lin.weight, lin.bias
        self.register_buffer("scale_inv", torch.ones(2, device=lin.weight.device))
        self.history = torch.zeros(4, device=lin.weight.device)

    def forward(self, x):
        self.history = torch.cat([x.detach().abs().amax()[None], self.history[:-1]])
        self.scale_inv.fill_(float(self.history.max()) / 448.0)
        return torch.nn.functional.linear(x, self.weight, self.bias)

    def get_extra_state(self):
        return self.history.clone()

    def set_extra_state(self, state):
        self.history = state.clone()


def run_once(model):
    c = model.config
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        model(torch.randn(2, c.in_channels, c.input_size, c.input_size, generator=g), torch.randn(2, generator=g),
              torch.randn(2, 7, c.caption_channels, generator=g))


def test_library_fp8_linears_keep_the_published_format_and_their_scaling_state_beside_it():
    """A Transformer Engine-like module adds `_extra_state` and a buffer to its state dict; the
    converted model still saves exactly the published entries, loads them strictly, and carries
    that state through scaling_state / load_scaling_state."""
    assert {"_extra_state", "scale_inv"} <= set(FakeTELinear(torch.nn.Linear(2, 3)).state_dict())
    ref = small_model()
    model = fp8.replace_block_linears(copy.deepcopy(ref), FakeTELinear)
    n_linears = sum(isinstance(m, FakeTELinear) for m in model.modules())
    assert n_linears == len(list(fp8.block_linears(ref))) > 0
    run_once(model)
    sd = model.state_dict()
    assert list(sd) == list(ref.state_dict())
    assert all(torch.equal(sd[k], v) for k, v in ref.state_dict().items())
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    assert list(get_model_state_dict(model)) == list(sd)  # the trainer's own path
    plain = small_model().to(torch.bfloat16)  # an FP8 run's weights in a bf16 model ...
    plain.load_state_dict(sd, strict=True)
    back = fp8.replace_block_linears(small_model(), FakeTELinear)
    back.load_state_dict(plain.state_dict(), strict=True)  # ... and back, with no `_extra_state` asked for
    set_model_state_dict(back, plain.state_dict())
    assert all(torch.equal(v, sd[k].bfloat16().to(v.dtype)) for k, v in back.state_dict().items())
    scaling = fp8.scaling_state(model)
    assert sorted({k.rsplit(".", 1)[1] for k in scaling}) == ["_extra_state", "scale_inv"]
    assert len(scaling) == 2 * n_linears and any(v.abs().sum() > 0 for v in scaling.values())
    fp8.load_scaling_state(back, scaling)
    for (n, a), (_, b) in zip(model.named_modules(), back.named_modules()):
        if isinstance(a, FakeTELinear):
            assert torch.equal(a.history, b.history) and torch.equal(a.scale_inv, b.scale_inv), n
    with pytest.raises(KeyError, match="missing"):
        fp8.load_scaling_state(back, {k: v for k, v in scaling.items() if "scale_inv" not in k})


@pytest.mark.parametrize("make", [None, FakeTELinear], ids=["torch", "te_like"])
def test_fp8_xl_saves_the_published_xl_key_set(xl_tensor_list, make):
    from tests.models.test_checkpoint import xl_meta_state_dict
    from microdit.models.checkpoint import load_reference

    m = load_reference(xl_meta_state_dict(xl_tensor_list))
    m = fp8.convert(m, backend="torch") if make is None else fp8.replace_block_linears(m, make)
    sd = m.state_dict()
    assert {k: tuple(v.shape) for k, v in sd.items()} == dict(xl_tensor_list)


class CountScaledMM(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._scaled_mm.default:
            self.calls += 1
        return func(*args, **(kwargs or {}))


def test_training_step_runs_block_gemms_through_scaled_mm(tmp_path):
    """One trainer step with train.precision=fp8 on the torch backend: every FP8 linear runs one
    _scaled_mm forward and two backward; every expert two forward and four backward."""
    from microdit.train.config import load_config
    from microdit.train.trainer import Trainer
    from tests.train.fakes import DATA_INFO, MemoryLoader

    cfg = load_config(None, [f"out={tmp_path}", "model.preset=MicroDiT_Test_2", "train.precision=fp8",
                             "fp8.backend=torch", "train.global_batch=2", "train.micro_batch=2", "train.steps=1",
                             "train.tensorboard=false", "diffusion.mask_ratio=0.5"])
    t = Trainer(cfg, MemoryLoader(batch_size=2), DATA_INFO)
    linears = sum(isinstance(m, fp8.Fp8Linear) for m in t.raw.modules())
    experts = sum(m.w1.shape[0] for m in t.raw.modules() if isinstance(m, fp8.Fp8ExpertChoiceMoE))
    assert linears > 0 and experts > 0
    with CountScaledMM() as count:
        loss, _ = t.train_step([next(iter(t.loader))])
    assert torch.isfinite(loss)
    assert count.calls == 3 * linears + 6 * experts


def test_config_checks_fp8_keys():
    from microdit.train.config import load_config

    with pytest.raises(ValueError, match="fp8.recipe"):
        load_config(None, ["fp8.recipe=blockwise"])
    with pytest.raises(ValueError, match="fp8.backend"):
        load_config(None, ["fp8.backend=cublas"])


def structured_loader():
    """Four smooth latent patterns, each with its own caption: a distribution a model learns fast."""
    from tests.train.fakes import MemoryLoader

    loader = MemoryLoader(n=64, batch_size=8)
    g = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 8), torch.linspace(-1, 1, 8), indexing="ij")
    basis = torch.stack([xx, yy, xx * yy, torch.cos(3 * xx), torch.sin(3 * yy), xx**2 - yy**2])  # (6, 8, 8)
    patterns = torch.einsum("kcb,bhw->kchw", torch.randn(4, 4, 6, generator=g), basis)  # (4, C, 8, 8)
    captions = torch.randn(4, 5, 32, generator=g)
    cls = torch.arange(64) % 4
    loader.latents = patterns[cls] + 0.05 * torch.randn(64, 4, 8, 8, generator=g)
    loader.captions = captions[cls]
    return loader


def train_losses(tmp_path, precision, steps):
    from microdit.train.config import load_config
    from microdit.train.trainer import Trainer
    from tests.train.fakes import DATA_INFO, MemoryLoader

    cfg = load_config(None, [f"out={tmp_path / precision}", "model.preset=MicroDiT_Test_2",
                             f"train.precision={precision}", "fp8.backend=emulated", "train.global_batch=8",
                             "train.micro_batch=8", f"train.steps={steps}", "train.tensorboard=false",
                             "train.log_every=1000", f"train.ckpt_every={steps}", "optim.warmup_steps=20",
                             "optim.lr=0.002", "diffusion.mask_ratio=0.5"])
    torch.manual_seed(0)
    t = Trainer(cfg, structured_loader(), DATA_INFO)
    it, losses = iter(t.loader), []
    from microdit.train.optim import lr_at, set_lr
    for step in range(steps):
        set_lr(t.optimizer, lr_at(step, steps, cfg.optim))
        loss, _ = t.train_step([next(it)])
        t.optimizer.step()
        t.optimizer.zero_grad(set_to_none=True)
        t.step += 1
        losses.append(loss.item())
    return losses, t


@pytest.mark.slow
def test_fp8_training_matches_fp32(tmp_path):
    """The test model trained 300 steps with FP8 block GEMMs (emulated: the torch backend's FP8
    values, fast on a CPU) ends within 10% of the same run in fp32 (mean loss of the last 100 steps). Slow-marked: about
    a minute and a half on one core."""
    steps = 300
    l32, _ = train_losses(tmp_path, "fp32", steps)
    l8, t8 = train_losses(tmp_path, "fp8", steps)
    end32, end8 = sum(l32[-100:]) / 100, sum(l8[-100:]) / 100
    assert end32 < 0.8 * sum(l32[:20]) / 20  # it learned something
    assert abs(end8 - end32) <= 0.1 * end32, (end8, end32)
    assert any(isinstance(m, fp8.Fp8Linear) and m.emulate for m in t8.raw.modules())


def test_info_lists_the_fp8_backends_with_reasons():
    from microdit import info

    block = info.report().split("op fp8_linear:")[1].split("\nop ")[0]
    for backend in ("torch", "emulated", "torchao", "transformer_engine"):
        assert backend in block
    if not torch.cuda.is_available():
        assert "CUDA" in [l for l in block.splitlines() if l.strip().startswith("transformer_engine")][0]
    from microdit import availability

    line = [l for l in block.splitlines() if l.strip().startswith("torchao")][0]
    why = availability.torchao_float8_reasons()
    assert ("unavailable" in line and why[0][:40] in line) if why else \
        ("unavailable" not in line and line.rstrip().endswith("available"))


# torchao's float8 training, checked on the CPU (its Float8Linear calls torch._scaled_mm, which
# runs here) against the torch backend and the FP8 error rule: the `torchao` backend's own code
# and torchao's, not a stand-in.
def torchao_reasons():
    from microdit import availability

    return availability.torchao_float8_reasons()


needs_torchao = pytest.mark.skipif(bool(torchao_reasons()), reason="; ".join(torchao_reasons()))


def torchao_linear(lin, recipe):
    """torchao's Float8Linear of a copy of `lin` (fp8.convert takes a MicroDiT's block linears)."""
    from microdit import availability

    ao = availability.torchao_float8()
    m = torch.nn.Sequential(copy.deepcopy(lin))
    ao.convert_to_float8_training(m, config=ao.Float8LinearConfig.from_recipe_name(recipe))
    return m[0]


@needs_torchao
@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
@pytest.mark.parametrize("shape", [(37, 48, 24), (5, 77, 123), (64, 64, 96)], ids=str)
def test_torchao_within_fp8_error_and_equal_to_the_torch_backend(shape, recipe):
    """The same rule as ours for the forward and both gradients; tensorwise, both are dynamic
    amax scaling to e4m3 (e5m2 for the output gradient) through torch._scaled_mm, so they agree
    to float32 rounding. Rowwise differs in details (torchao rounds scales to powers of two)."""
    M, K, N = shape
    g = torch.Generator().manual_seed(M * K + N)
    lin = torch.nn.Linear(K, N, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(N, K, generator=g) * K**-0.5)
    x = (torch.randn(M, K, generator=g) * torch.rand(M, 1, generator=g) * 3).requires_grad_()
    dy = torch.randn(M, N, generator=g)
    ao = torchao_linear(lin, recipe)
    assert type(ao).__name__ == "Float8Linear"
    y = ao(x)
    dx, dw = torch.autograd.grad(y, (x, ao.weight), dy)
    x64, w64, dy64 = x.detach().double(), lin.weight.detach().double(), dy.double()
    fwd, grad = fp8.recipe_dtypes(recipe)
    rowwise = recipe == "rowwise"
    check_within(y, x64 @ w64.T, gemm_bound(x64, w64.T, fwd, fwd, rowwise), "torchao forward")
    check_within(dx, dy64 @ w64, gemm_bound(dy64, w64, grad, fwd, rowwise), "torchao dx")
    check_within(dw, dy64.T @ x64, gemm_bound(dy64.T, x64, grad, fwd, rowwise), "torchao dw")
    assert (y.double() - x64 @ w64.T).abs().max() > 1e-3 * (x64 @ w64.T).abs().max()  # really FP8
    if recipe == "tensorwise":
        ours = fp8.Fp8Linear.from_linear(copy.deepcopy(lin), recipe, False)
        xo = x.detach().clone().requires_grad_()
        yo = ours(xo)
        dxo, dwo = torch.autograd.grad(yo, (xo, ours.weight), dy)
        for a, b, what in ((y, yo, "y"), (dx, dxo, "dx"), (dw, dwo, "dw")):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6, msg=what)


@needs_torchao
def test_torchao_backend_converts_the_block_linears_and_keeps_the_published_format():
    ref = small_model()
    model = fp8.convert(copy.deepcopy(ref), backend="torchao", recipe="tensorwise")
    converted = {n for n, m in model.named_modules() if type(m).__name__ == "Float8Linear"}
    where = {id(m): n for n, m in ref.named_modules()}
    assert converted == {f"{where[id(parent)]}.{name}" for parent, name, _ in fp8.block_linears(ref)}
    moes = [m for m in model.modules() if isinstance(m, ExpertChoiceMoE)]
    assert moes and all(isinstance(m, fp8.Fp8ExpertChoiceMoE) and m.recipe == "tensorwise" for m in moes)
    sd = model.state_dict()
    assert list(sd) == list(ref.state_dict()) and all(torch.equal(sd[k], v) for k, v in ref.state_dict().items())
    plain = small_model()
    plain.load_state_dict(sd, strict=True)
    back = fp8.convert(small_model(), backend="torchao")
    back.load_state_dict(plain.state_dict(), strict=True)
    # it runs, and in FP8: close to the float32 model, not equal to it (weights off their init,
    # whose zero final layer and adaLN would make every output 0)
    c = ref.config
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
        model.load_state_dict(ref.state_dict(), strict=True)
    args = (torch.randn(2, c.in_channels, c.input_size, c.input_size, generator=g), torch.randn(2, generator=g).exp(),
            torch.randn(2, 7, c.caption_channels, generator=g))
    with torch.no_grad():
        out, out32 = model(*args), ref(*args)
    rel = ((out - out32).norm() / out32.norm()).item()
    assert 0 < rel < 0.2, rel


@needs_torchao
def test_training_step_with_torchao_runs_its_linears_through_scaled_mm(tmp_path, monkeypatch):
    """train.precision=fp8 with fp8.backend=torchao: each Float8Linear runs one _scaled_mm forward
    and two backward, each expert (through the torch backend's path) two and four. (torchao calls
    torch._scaled_mm inside its tensor subclass's dispatch, below any dispatch mode: counted at
    the Python function.)"""
    from microdit.train.config import load_config
    from microdit.train.trainer import Trainer
    from tests.train.fakes import DATA_INFO, MemoryLoader

    cfg = load_config(None, [f"out={tmp_path}", "model.preset=MicroDiT_Test_2", "train.precision=fp8",
                             "fp8.backend=torchao", "train.global_batch=2", "train.micro_batch=2", "train.steps=1",
                             "train.tensorboard=false", "diffusion.mask_ratio=0.5"])
    t = Trainer(cfg, MemoryLoader(batch_size=2), DATA_INFO)
    linears = sum(type(m).__name__ == "Float8Linear" for m in t.raw.modules())
    assert linears == len(list(fp8.block_linears(small_model())))
    experts = sum(m.w1.shape[0] for m in t.raw.modules() if isinstance(m, fp8.Fp8ExpertChoiceMoE))
    assert experts > 0
    calls, real = [], torch._scaled_mm

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "_scaled_mm", counted)
    loss, _ = t.train_step([next(iter(t.loader))])
    assert torch.isfinite(loss)
    assert len(calls) == 3 * linears + 6 * experts
    t.optimizer.step()
    assert all(torch.isfinite(p).all() for p in t.raw.parameters())

