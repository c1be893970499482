"""torch.compile of the training step: no graph breaks (torch._dynamo.explain) in the forward and
loss with every CPU backend choice, and a fullgraph compile whose gradients equal eager ones."""
import pytest
import torch

import microdit
from microdit import fp8
from microdit.diffusion import edm
from microdit.ops.registry import ALL_OPS

REFERENCE = {name: "reference" for name in ALL_OPS if "reference" in ALL_OPS[name].impls
             and name not in ("keep_indices",)}


def step_inputs(B=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    x0, y = torch.randn(B, 4, 8, 8, generator=g), torch.randn(B, 5, 32, generator=g)
    rnd, noise = torch.randn(B, 1, 1, 1, generator=g), torch.randn(B, 4, 8, 8, generator=g)
    ids = torch.stack([torch.randperm(16, generator=g)[:8] for _ in range(B)])
    return x0, y, rnd, noise, ids


def loss_fn(model):
    def fn(x0, y, rnd, noise, ids):
        return edm.loss(model, x0, y, rnd_normal=rnd, noise=noise, ids_keep=ids)
    return fn


@pytest.mark.parametrize("setting", ["auto", "reference", "fp8"])
def test_forward_and_loss_have_no_graph_breaks(setting):
    backends = REFERENCE if setting == "reference" else {}
    model = microdit.create_model("MicroDiT_Test_2", backends=backends).initialize_weights()
    if setting == "fp8":
        fp8.convert(model, backend="torch")
    torch._dynamo.reset()
    explain = torch._dynamo.explain(loss_fn(model))(*step_inputs())
    assert explain.graph_break_count == 0, [r.reason.splitlines()[0] for r in explain.break_reasons]
    assert explain.graph_count == 1


@pytest.mark.slow
def test_fullgraph_step_gradients_equal_eager():
    """Forward, loss and backward compiled as one graph each (AOTAutograd), fullgraph=True."""
    torch.manual_seed(0)
    model = microdit.create_model("MicroDiT_Test_2").initialize_weights()
    ins = step_inputs()
    loss_fn(model)(*ins).backward()
    eager = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    torch._dynamo.reset()
    loss = torch.compile(loss_fn(model), backend="aot_eager", fullgraph=True)(*ins)
    loss.backward()
    for p, g in zip(model.parameters(), eager):
        torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-7)
