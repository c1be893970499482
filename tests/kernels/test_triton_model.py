"""The published code's outputs with every op on its Triton backend (float32, rel. err < 1e-5)."""
import pytest
import torch

import microdit
from microdit import edm
from tests.helpers import rel_err
from tests.kernels.triton_env import DEVICE, reason

pytestmark = pytest.mark.skipif(reason is not None, reason=reason or "")
TRITON = {"moe": "triton", "keep_indices": "triton", "mask_tokens": "triton", "unmask_tokens": "triton",
          "qk_norm": "triton", "swiglu": "triton"}


@pytest.fixture(scope="module", autouse=True)
def no_tf32():
    """On a GPU, float32 convolutions default to TF32 (cuDNN), too coarse for 1e-5."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.fixture(scope="module")
def model(reference):
    return microdit.load_reference(reference["state_dict"], reference["config"], backends=TRITON).eval().to(DEVICE)


def test_forward_and_masked_forward(model, reference):
    i, o = {k: v.to(DEVICE) for k, v in reference["inputs"].items()}, reference["outputs"]
    with torch.no_grad():
        assert rel_err(model(i["x"], i["t"], i["y"]).cpu(), o["forward"]) < 1e-5
        assert rel_err(model(i["x"], i["t"], i["y"], ids_keep=i["ids_keep"]).cpu(), o["forward_mask75"]) < 1e-5


def test_edm_loss_and_its_gradient_match_the_reference_backends(model, reference):
    i, o = {k: v.to(DEVICE) for k, v in reference["inputs"].items()}, reference["outputs"]
    loss = edm.loss(model, i["x0"], i["y"], rnd_normal=i["rnd_normal"], noise=i["noise"], ids_keep=i["ids_keep"])
    assert rel_err(loss.detach().cpu(), o["edm_loss_mask75"]) < 1e-5
    grads = torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)
    ref_model = microdit.load_reference(reference["state_dict"], reference["config"],
                                        backends={k: "reference" for k in TRITON}).eval().to(DEVICE)
    ref_loss = edm.loss(ref_model, i["x0"], i["y"], rnd_normal=i["rnd_normal"], noise=i["noise"], ids_keep=i["ids_keep"])
    ref_grads = torch.autograd.grad(ref_loss, list(ref_model.parameters()), allow_unused=True)
    for (name, _), g, r in zip(model.named_parameters(), grads, ref_grads):
        assert (g is None) == (r is None), name
        if g is not None and r.norm() > 0:
            assert rel_err(g, r) < 1e-4, name
