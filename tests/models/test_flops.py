"""The analytic FLOP count equals what torch.utils.flop_counter measures."""
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import microdit
from microdit.models.flops import model_flops


# The CPU flash-attention kernel is not counted by FlopCounterMode, and the `sdpa` attention
# backend pins its own kernel order: the models here run the `reference` attention (its matmuls
# are counted; SDPA's math path inside the context below stays for any other SDPA call).
ATTN = {"attention": "reference"}


def measure(model, x, t, y, mask_ratio, train):
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
        out = model(x, t, y, mask_ratio=mask_ratio)
        if train:
            out.square().mean().backward()
    return fc.get_total_flops()


@pytest.mark.parametrize("overrides", [{}, {"use_patch_mixer": False}, {"patch_mixer_dim": 64}],
                         ids=["mixer", "no-mixer", "mixer-same-width"])
@pytest.mark.parametrize("mask_ratio", [0.0, 0.5, 0.75])
def test_matches_flop_counter(overrides, mask_ratio):
    m = microdit.create_model("MicroDiT_Test_2", backends={"moe": "torch", **ATTN}, **overrides)
    B, L = 3, 7
    x, t, y = torch.randn(B, 4, 8, 8), torch.randn(B), torch.randn(B, L, 32)
    fc = model_flops(m.config, mask_ratio, caption_len=L)
    assert measure(m, x, t, y, mask_ratio, False) == B * fc.forward
    assert measure(m, x, t, y, mask_ratio, True) == B * fc.training


def test_reference_moe_pays_the_onehot_overhead():
    m = microdit.create_model("MicroDiT_Test_2", backends={"moe": "reference", **ATTN})
    x, t, y = torch.randn(2, 4, 8, 8), torch.randn(2), torch.randn(2, 7, 32)
    fc = model_flops(m.config, 0.75, caption_len=7)
    assert measure(m, x, t, y, 0.75, False) == 2 * (fc.forward + fc.moe_onehot_overhead)


def test_xl_phase1_numbers():
    cfg = microdit.preset_config("MicroDiT_XL_2")
    masked, full = model_flops(cfg, 0.75), model_flops(cfg, 0.0)
    # Masking 75% after the mixer cuts backbone work about 4x; the mixer still sees every token.
    assert 2.5 < full.training / masked.training < 4
    assert 0.1e12 < masked.training < 1e12
