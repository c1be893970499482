"""The published code's outputs, reproduced through the public API (float32, CPU, rel. err < 1e-5)."""
import itertools

import pytest
import torch

import microdit
from microdit import edm
from microdit.ops import attention, ln_modulate, moe, multi_linear, qk_norm, residual_ln_modulate, swiglu
from microdit.ops.keep_indices import drop_mask
from microdit.ops.mask_tokens import mask_tokens_op
from microdit.ops.unmask_tokens import unmask_tokens_op
from microdit.ops.unmask_unpatchify import unmask_unpatchify_op
from tests.helpers import available_backends
from tests.helpers import rel_err as _rel_err


def rel_err(a, b):
    return _rel_err(a.cpu(), b.cpu())

TOL = 1e-5
COMBOS = [
    {"moe": m, "mask_tokens": k, "unmask_tokens": k, "unmask_unpatchify": k}
    for m, k in itertools.product(available_backends(moe.moe_op),
                                  available_backends(mask_tokens_op))
    if k in available_backends(unmask_tokens_op) and k in available_backends(unmask_unpatchify_op)
    # A CPU-only backend (cpp) and a GPU-only one (cuda, triton) cannot share one model's device.
    and not ({m, k} & {"cpp"} and {m, k} & {"cuda", "triton"})
]
# The block's attention and fusion ops: all published (reference), and every other CPU backend
# chosen explicitly (the automatic choice, above, already picks them where they are the best).
FUSION_OPS = {"attention": attention.attention_op, "swiglu": swiglu.swiglu_op, "ln_modulate": ln_modulate.ln_modulate_op,
              "residual_ln_modulate": residual_ln_modulate.residual_ln_modulate_op,
              "multi_linear": multi_linear.multi_linear_op, "qk_norm": qk_norm.qk_norm_op}
FUSIONS = [{name: "reference" for name in FUSION_OPS}] + [
    {name: backend} for name, op in FUSION_OPS.items() for backend in available_backends(op)
    if backend != "reference" and (backend != "triton" or torch.cuda.is_available())]
COMBOS += [{**COMBOS[0], **f} for f in FUSIONS]


def combo_id(c):
    fused = ",".join(f"{k}={v}" for k, v in c.items() if k in FUSION_OPS)
    return f"moe={c['moe']},mask={c['mask_tokens']}" + (f",{fused}" if fused else "")


@pytest.fixture(scope="module", params=COMBOS, ids=combo_id)
def model(request, reference):
    return microdit.load_reference(reference["state_dict"], reference["config"], backends=request.param).eval()


def _device(model):
    """GPU backends run the model on the GPU (in float32, TF32 off); the rest on the CPU."""
    gpu_backends = ("cuda", "triton", "flash_attn", "xformers", "transformer_engine")
    gpu = any(b in gpu_backends for b in model.config.backends.values()) and torch.cuda.is_available()
    if gpu:
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    return "cuda" if gpu else "cpu"


@pytest.fixture(autouse=True)
def _on_device(request, reference):
    """Moves the model and inputs to the device its backends need; outputs come back to the CPU."""
    if "model" not in request.fixturenames:
        yield
        return
    m = request.getfixturevalue("model")
    dev = _device(m)
    m.to(dev)
    saved = reference["inputs"]
    reference["inputs"] = {k: v.to(dev) for k, v in saved.items()}
    try:
        yield
    finally:
        reference["inputs"] = saved


def test_forward(model, reference):
    i = reference["inputs"]
    with torch.no_grad():
        out = model(i["x"], i["t"], i["y"])
    assert rel_err(out, reference["outputs"]["forward"]) < TOL


def test_forward_caption_without_singleton_dim(model, reference):
    i = reference["inputs"]
    with torch.no_grad():
        out = model(i["x"], i["t"], i["y"].squeeze(1))
    assert rel_err(out, reference["outputs"]["forward"]) < TOL


def test_forward_cfg4(model, reference):
    i = reference["inputs"]
    with torch.no_grad():
        out = model(i["x"], i["t"], i["y"], guidance=4.0)
    assert rel_err(out, reference["outputs"]["forward_cfg4"]) < TOL


def test_forward_mask75(model, reference):
    i, o = reference["inputs"], reference["outputs"]
    with torch.no_grad():
        out = model(i["x"], i["t"], i["y"], ids_keep=i["ids_keep"])
    assert rel_err(out, o["forward_mask75"]) < TOL
    assert torch.equal(drop_mask(i["ids_keep"], o["mask75"].shape[1]).cpu(), o["mask75"])


@pytest.mark.parametrize("masked", [True, False], ids=["mask75", "full"])
def test_edm_loss(model, reference, masked):
    i, o = reference["inputs"], reference["outputs"]
    with torch.no_grad():
        loss = edm.loss(model, i["x0"], i["y"], rnd_normal=i["rnd_normal"], noise=i["noise"],
                        ids_keep=i["ids_keep"] if masked else None)
    assert rel_err(loss, o["edm_loss_mask75" if masked else "edm_loss_full"]) < TOL


def test_sampler(model, reference):
    i = reference["inputs"]
    out = edm.sample(model, i["sampler_noise"], i["y"], steps=6, guidance=4.0)
    assert out.dtype == torch.float32
    assert rel_err(out, reference["outputs"]["sampler_6steps_cfg4"]) < TOL


@pytest.mark.slow
def test_compiled_forward_and_loss(reference):
    """The model under torch.compile (fused ops, automatic backends) reproduces the vectors."""
    m = microdit.load_reference(reference["state_dict"], reference["config"]).eval()
    i, o = reference["inputs"], reference["outputs"]
    compiled = torch.compile(m, fullgraph=True)
    with torch.no_grad():
        out = compiled(i["x"], i["t"], i["y"], ids_keep=i["ids_keep"])
    assert rel_err(out, o["forward_mask75"]) < TOL
