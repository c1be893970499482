"""`MicroDiTConfig.init_std`: the published 0.02 inits (spec 4b) as a setting for narrow models."""
import pytest
import torch

from microdit import MicroDiT, preset_config


def _init(**overrides):
    torch.manual_seed(0)
    return MicroDiT(preset_config("MicroDiT_Test_2", **overrides)).initialize_weights()


def test_default_is_the_published_init():
    m = _init()
    assert m.config.init_std == 0.02
    w = m.blocks[0].attn.qkv.weight
    assert 0.015 < float(w.std()) < 0.02 and float(w.abs().max()) <= 0.04 + 1e-7  # trunc-normal(0.02) at 2 sd
    # Output projections keep the depth scaling 0.02 / sqrt(2 (i + 1)).
    p = m.blocks[3].attn.proj.weight
    assert float(p.abs().max()) <= 2 * 0.02 / (2 * 4) ** 0.5 + 1e-7


def test_init_std_scales_exactly_the_published_small_inits():
    a, b = _init(), _init(init_std=0.1)
    sa, sb = a.state_dict(), b.state_dict()
    scaled = 0
    for name, ta in sa.items():
        tb = sb[name]
        if name in ("pos_embed", "mask_token") or ta.abs().max() == 0:
            assert torch.equal(ta, tb), name  # buffers and zero inits unchanged
            continue
        if torch.equal(ta, tb):
            continue  # xavier-uniform layers (embedders' inputs, mixer maps) are not 0.02 inits
        torch.testing.assert_close(tb, ta * 5, rtol=1e-5, atol=1e-7, msg=name)
        scaled += 1
    # qkv, proj, cross q/kv/proj, FFN or expert weights, router: in every block; the MLPs of
    # the timestep, caption and pooled caption paths.
    assert scaled >= 6 * (4 + 2)


def test_bad_init_std_is_refused():
    with pytest.raises(ValueError, match="init_std must be > 0"):
        _init(init_std=0.0)



# A small model for the norm-choice tests.
_SMALL = dict(input_size=8, patch_size=2, in_channels=4, dim=64, depth=2, head_dim=32, multiple_of=32,
              caption_channels=16, patch_mixer_depth=1, patch_mixer_dim=64, num_experts=2)

def test_final_norm_none_keeps_the_state_dict_and_drops_the_division():
    import torch

    from microdit.models.config import MicroDiTConfig
    from microdit.models.microdit import MicroDiT

    base = dict(_SMALL)
    torch.manual_seed(0)
    a = MicroDiT(MicroDiTConfig(**base))
    b = MicroDiT(MicroDiTConfig(**base, final_norm="none"))
    assert a.state_dict().keys() == b.state_dict().keys()
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 5, 64) * 7
    torch.testing.assert_close(b.final_layer.norm_final(x), x)  # weight 1: no division by the token's scale
    assert not torch.allclose(a.final_layer.norm_final(x), x)
    with pytest.raises(ValueError, match="final_norm"):
        MicroDiTConfig(**base, final_norm="rms")


def test_mixer_map_norm_none_keeps_the_state_dict_and_drops_the_division():
    import torch

    from microdit.models.config import MicroDiTConfig
    from microdit.models.microdit import MicroDiT

    base = dict(_SMALL, patch_mixer_dim=32)  # Dm != D: the mixer has its maps
    torch.manual_seed(0)
    a = MicroDiT(MicroDiTConfig(**base))
    b = MicroDiT(MicroDiTConfig(**base, mixer_map_norm="none"))
    assert a.state_dict().keys() == b.state_dict().keys()
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 5, 64) * 7
    # Linear maps: twice the input gives twice the output (a LayerNorm in front would not).
    torch.testing.assert_close(b.patch_mixer_map_xin(2 * x), 2 * b.patch_mixer_map_xin(x))
    torch.testing.assert_close(b.patch_mixer_map_xout(2 * x[..., :32]), 2 * b.patch_mixer_map_xout(x[..., :32]))
    assert not torch.allclose(a.patch_mixer_map_xin(2 * x), 2 * a.patch_mixer_map_xin(x))
    assert isinstance(b.patch_mixer_map_y[0], torch.nn.LayerNorm)  # the caption's map keeps its norm
    with pytest.raises(ValueError, match="mixer_map_norm"):
        MicroDiTConfig(**base, mixer_map_norm="rms")
