"""AdamW's fused kernel: chosen on CUDA by default, foreach on the CPU unless asked; same update."""
import pytest
import torch

import microdit
from microdit.train.config import OptimSection, load_config
from microdit.train.optim import build_optimizer


def test_default_is_foreach_on_cpu_and_fused_when_asked():
    m = microdit.create_model("MicroDiT_Test_2")
    assert not build_optimizer(m, OptimSection()).defaults["fused"]
    assert build_optimizer(m, OptimSection(fused=True)).defaults["fused"]
    assert load_config(None, ["optim.fused=true"]).optim.fused is True


def test_fused_step_matches_foreach():
    torch.manual_seed(0)
    ms = [microdit.create_model("MicroDiT_Test_2").initialize_weights() for _ in range(2)]
    ms[1].load_state_dict(ms[0].state_dict())
    opts = [build_optimizer(m, OptimSection(lr=1e-3, fused=f)) for m, f in zip(ms, (False, True))]
    for m in ms:
        for p in m.parameters():
            p.grad = torch.full_like(p, 0.5)
    for o in opts:
        o.step()
    for a, b in zip(*(m.parameters() for m in ms)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.gpu
def test_fused_by_default_on_cuda():
    m = microdit.create_model("MicroDiT_Test_2").cuda()
    assert build_optimizer(m, OptimSection()).defaults["fused"]
