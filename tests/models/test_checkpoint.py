"""Loading and saving the published checkpoint format; clear errors for anything else."""
import math

import pytest
import torch

import microdit
from microdit import CheckpointError, load_reference, save_reference
from microdit.models.microdit import sincos_pos_table


def xl_meta_state_dict(xl_tensor_list, channels=4, grid=16, interp=1.0):
    """A published-format XL state dict of meta tensors (shapes only), optionally 16-ch or 512 px."""
    sd = {}
    for name, shape in xl_tensor_list:
        if name == "x_embedder.proj.weight":
            shape = (1024, channels, 2, 2)
        elif name in ("mask_token",):
            shape = (1, 1, 4 * channels)
        elif name == "final_layer.linear.weight":
            shape = (4 * channels, 1024)
        elif name == "final_layer.linear.bias":
            shape = (4 * channels,)
        sd[name] = torch.empty(shape, device="meta")
    sd["pos_embed"] = torch.from_numpy(sincos_pos_table(1024, grid, grid, interp)).float().unsqueeze(0)
    return sd


def test_roundtrip_identical(reference, tmp_path):
    m = load_reference(reference["state_dict"], reference["config"])
    for name in ("ckpt.pt", "ckpt.safetensors"):
        path = save_reference(m, tmp_path / name)
        if name.endswith(".pt"):
            back = torch.load(path, weights_only=True)
        else:
            from safetensors.torch import load_file

            back = load_file(path)
        # safetensors stores keys sorted; the torch format keeps the published order.
        assert (list(back) if name.endswith(".pt") else sorted(back)) == (
            list(reference["state_dict"]) if name.endswith(".pt") else sorted(reference["state_dict"]))
        for k, v in reference["state_dict"].items():
            assert torch.equal(back[k], v), k
        again = load_reference(path, reference["config"])
        for k, v in again.state_dict().items():
            assert torch.equal(v, reference["state_dict"][k]), k


def test_loaded_model_does_not_alias_callers_dict(reference):
    sd = {k: v.clone() for k, v in reference["state_dict"].items()}
    m = load_reference(sd, reference["config"])
    with torch.no_grad():
        m.blocks[0].norm1.weight.add_(1.0)
    assert torch.equal(sd["blocks.0.norm1.weight"], reference["state_dict"]["blocks.0.norm1.weight"])


@pytest.mark.parametrize("wrap", ["dit_prefix", "model_key", "composer_state", "with_vae_keys"])
def test_wrapped_formats(reference, wrap):
    sd = reference["state_dict"]
    obj = {
        "dit_prefix": {f"dit.{k}": v for k, v in sd.items()},
        "model_key": {"model": sd, "optimizer": {"lr": 1.0}},
        "composer_state": {"state": {"model": {f"dit.{k}": v for k, v in sd.items()}}},
        "with_vae_keys": {**{f"dit.{k}": v for k, v in sd.items()},
                          "vae.encoder.conv_in.weight": torch.zeros(3), "text_encoder.x": torch.zeros(1)},
    }[wrap]
    m = load_reference(obj, reference["config"])
    for k, v in m.state_dict().items():
        assert torch.equal(v, sd[k])


def test_missing_tensor_is_named(reference):
    sd = dict(reference["state_dict"])
    del sd["blocks.2.cross_attn.kv_linear.weight"]
    with pytest.raises(CheckpointError, match=r"missing tensor 'blocks\.2\.cross_attn\.kv_linear\.weight'"):
        load_reference(sd, reference["config"])


def test_wrong_shape_is_named(reference):
    sd = dict(reference["state_dict"])
    sd["blocks.1.mlp.w1"] = torch.zeros(4, 128, 255)
    with pytest.raises(CheckpointError, match=r"'blocks\.1\.mlp\.w1' has shape \(4, 128, 255\), expected \(4, 128, 256\)"):
        load_reference(sd, reference["config"])


def test_unexpected_dit_tensor(reference):
    sd = dict(reference["state_dict"])
    sd["blocks.9.norm1.weight"] = torch.zeros(128)
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'blocks\.9\.norm1\.weight'"):
        load_reference(sd, reference["config"])


def test_unknown_architecture_needs_config(reference):
    with pytest.raises(CheckpointError, match="match no preset"):
        load_reference(reference["state_dict"])


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_reference(tmp_path / "nope.pt")
    bad = tmp_path / "garbage.pt"
    bad.write_bytes(b"this is not a checkpoint" * 10)
    with pytest.raises(CheckpointError, match="garbage.pt"):
        load_reference(bad)
    with pytest.raises(CheckpointError, match="no MicroDiT tensors"):
        load_reference({"vae.weight": torch.zeros(1)})
    with pytest.raises(CheckpointError, match="expected a state dict"):
        load_reference([1, 2, 3])


def test_truncated_file_names_the_path(reference, tmp_path):
    path = save_reference(load_reference(reference["state_dict"], reference["config"]), tmp_path / "c.pt")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="c.pt"):
        load_reference(path, reference["config"])


@pytest.mark.parametrize("channels,grid,interp", [(4, 16, 1.0), (16, 32, 2.0), (4, 32, 2.0)],
                         ids=["xl-4ch-256px", "xl-16ch-512px", "xl-4ch-512px"])
def test_xl_variants_infer_config(xl_tensor_list, channels, grid, interp):
    m = load_reference(xl_meta_state_dict(xl_tensor_list, channels, grid, interp))
    cfg = m.config
    assert (cfg.dim, cfg.depth, cfg.in_channels, cfg.input_size) == (1024, 28, channels, 2 * grid)
    assert cfg.pos_interp_scale == interp
    assert m.num_parameters() == 1_165_442_320 + (channels - 4) * (4 * 1024 + 4 + 4 * 1024)
    assert torch.equal(m.pos_embed, torch.from_numpy(sincos_pos_table(1024, grid, grid, interp)).float()[None])


def test_xl_wrong_caption_width_is_named(xl_tensor_list):
    sd = xl_meta_state_dict(xl_tensor_list)
    sd["y_embedder.y_proj.fc1.weight"] = torch.empty(1024, 768, device="meta")
    cfg = microdit.preset_config("MicroDiT_XL_2")
    with pytest.raises(CheckpointError, match=r"y_embedder\.y_proj\.fc1\.weight"):
        load_reference(sd, cfg)


@pytest.mark.slow
def test_xl_full_roundtrip_identical(xl_tensor_list, tmp_path):
    """A real-valued published-format XL file (4.7 GB) loads and saves back bit for bit."""
    g = torch.Generator().manual_seed(0)
    sd = {name: torch.rand(shape, generator=g) for name, shape in xl_tensor_list}
    src = tmp_path / "xl.pt"
    torch.save(sd, src)
    m = load_reference(src)
    assert m.config.dim == 1024 and m.num_parameters() == 1_165_442_320
    out = save_reference(m, tmp_path / "xl_back.pt")
    del m
    back = torch.load(out, weights_only=True, mmap=True)
    assert list(back) == list(sd)
    for k, v in sd.items():
        assert torch.equal(back[k], v), k
