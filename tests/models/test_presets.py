"""Preset architectures: exact parameter counts and the published tensor names and shapes."""
import pytest
import torch

import microdit
from microdit import MicroDiT, preset_config


def meta_model(name, **kw) -> MicroDiT:
    with torch.device("meta"):
        return MicroDiT(preset_config(name, **kw))


@pytest.mark.parametrize("name,count", [("MicroDiT_Tiny_2", 200_692_752), ("MicroDiT_XL_2", 1_165_442_320)])
def test_parameter_count(name, count):
    assert meta_model(name).num_parameters() == count


def test_xl_state_dict_matches_published_tensor_list(xl_tensor_list):
    sd = meta_model("MicroDiT_XL_2").state_dict()
    assert [(k, tuple(v.shape)) for k, v in sd.items()] == xl_tensor_list


def test_xl_layerwise_scaling_and_moe_placement():
    m = meta_model("MicroDiT_XL_2")
    widths = [b.attn.width for b in m.blocks]
    assert widths[0] == 512 and widths[1] == 640 and widths[-1] == 1024
    assert widths == sorted(widths)
    moe = [i for i, b in enumerate(m.blocks) if hasattr(b.mlp, "gate")]
    assert moe == list(range(1, 27, 2))  # every second block, never the last
    assert [i for i, b in enumerate(m.patch_mixer) if hasattr(b.mlp, "gate")] == [1, 3, 5]


def test_overriding_depth_recomputes_layerwise_ratios():
    cfg = preset_config("MicroDiT_XL_2", depth=8)
    assert len(cfg.qkv_multipliers) == 8 and cfg.qkv_multipliers[0] == 0.5 and cfg.qkv_multipliers[-1] == 1.0


def test_unknown_preset_and_keys():
    with pytest.raises(KeyError, match="unknown MicroDiT preset"):
        microdit.create_model("MicroDiT_Huge_9")
    with pytest.raises(ValueError, match="unknown MicroDiT config keys"):
        microdit.MicroDiTConfig.from_dict({"dimm": 3})
    with pytest.raises(ValueError, match="qkv_multipliers"):
        microdit.MicroDiTConfig(depth=3, qkv_multipliers=[1.0, 1.0])


def test_create_model_initialisation():
    m = microdit.create_model("MicroDiT_Test_2")
    assert m.final_layer.linear.weight.abs().sum() == 0 and m.mask_token.abs().sum() == 0
    assert all(b.adaLN_modulation[-1].weight.abs().sum() == 0 for b in m.blocks)
    assert m.blocks[0].attn.qkv.weight.std() > 0
    # Zero-initialised output layer: F is exactly zero at step 0.
    x, y = torch.randn(2, 4, 8, 8), torch.randn(2, 5, m.config.caption_channels)
    assert torch.count_nonzero(m(x, torch.zeros(2), y)) == 0
