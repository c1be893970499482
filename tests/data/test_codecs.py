"""Tests for the image codecs: shapes, exactness, scaling, metadata round trips.

The VAE paths run on tiny diffusers AutoencoderKL models made here and saved to disk.
"""
import json

import numpy as np
import pytest
import torch

from microdit import availability
from microdit.data.codecs import codec_from_metadata, get_codec

needs_diffusers = pytest.mark.skipif(not availability.diffusers(), reason=(
    f"diffusers not importable ({availability.diffusers()!r})"))


def _images(n=3, size=32, seed=0):
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8))


def _json_round_trip(meta):
    return json.loads(json.dumps(meta))


# ---------------------------------------------------------------------------------------- pixels

@pytest.mark.parametrize("spec,factor", [("pixels", 1), ("pixels:2", 2), ("pixels:4", 4)])
def test_pixels_round_trip_is_exact(spec, factor):
    codec = get_codec(spec)
    images = _images(size=32)
    z = codec.encode(images)
    assert (codec.name, codec.channels, codec.downsample) == (spec, 3 * factor ** 2, factor)
    assert z.dtype == torch.float32 and z.shape == (3, 3 * factor ** 2, 32 // factor, 32 // factor)
    assert z.min() >= -1 and z.max() <= 1
    assert codec.latent_shape(32) == tuple(z.shape[1:])
    out = codec.decode(z)
    assert out.dtype == torch.uint8 and torch.equal(out, images)


def test_pixels_values_and_space_to_depth_layout():
    images = _images(n=2, size=8)
    z1 = get_codec("pixels").encode(images)
    torch.testing.assert_close(z1, images.permute(0, 3, 1, 2).float() / 127.5 - 1)
    z2 = get_codec("pixels:2").encode(images)
    # channel c*4 + 2*i + j of latent pixel (y, x) is colour c of image pixel (2y+i, 2x+j)
    for c, i, j, y, x in [(0, 0, 0, 0, 0), (1, 1, 0, 2, 3), (2, 1, 1, 3, 1)]:
        assert z2[1, c * 4 + 2 * i + j, y, x] == z1[1, c, 2 * y + i, 2 * x + j]


def test_pixels_scaling_and_shift_are_applied_and_inverted():
    images = _images()
    codec = get_codec("pixels:2", scaling_factor=0.5, shift_factor=0.25)
    z = codec.encode(images)
    torch.testing.assert_close(z, (get_codec("pixels:2").encode(images) - 0.25) * 0.5)
    assert torch.equal(codec.decode(z), images)


def test_pixels_metadata_round_trip():
    codec = get_codec("pixels:2", scaling_factor=0.7)
    meta = _json_round_trip(codec.metadata())
    assert meta["scaling_factor"] == 0.7 and meta["shift_factor"] == 0.0 and meta["channels"] == 12
    again = codec_from_metadata(meta)
    assert again.metadata() == codec.metadata()
    images = _images()
    assert torch.equal(again.decode(codec.encode(images)), images)


def test_pixels_scale_in_the_spec():
    """`pixels:F:SCALE` (the demo's way to give low-contrast images the std sigma_data expects)."""
    images = _images()
    codec = get_codec("pixels:2:3.5")
    assert (codec.name, codec.factor, codec.scaling_factor) == ("pixels:2", 2, 3.5)
    z = codec.encode(images)
    torch.testing.assert_close(z, get_codec("pixels:2").encode(images) * 3.5)
    assert torch.equal(codec.decode(z), images)
    again = codec_from_metadata(_json_round_trip(codec.metadata()))
    assert again.scaling_factor == 3.5 and torch.equal(again.decode(z), images)
    assert get_codec("pixels:2:3.5", scaling_factor=3.5).scaling_factor == 3.5
    with pytest.raises(ValueError, match="differs from scaling_factor"):
        get_codec("pixels:2:3.5", scaling_factor=2.0)
    with pytest.raises(ValueError, match="SCALE must be a number"):
        get_codec("pixels:2:x")
    with pytest.raises(ValueError, match="finite and non-zero"):
        get_codec("pixels:2:0")


def test_pixels_shift_in_the_spec():
    """`pixels:F:SCALE:SHIFT`: latents = (pixels - SHIFT) * SCALE, recorded and undone on decode."""
    images = _images()
    codec = get_codec("pixels:2:5:-2")
    assert (codec.factor, codec.scaling_factor, codec.shift_factor) == (2, 5.0, -2.0)
    z = codec.encode(images)
    torch.testing.assert_close(z, (get_codec("pixels:2").encode(images) + 2.0) * 5.0)
    assert torch.equal(codec.decode(z), images)
    again = codec_from_metadata(_json_round_trip(codec.metadata()))
    assert again.shift_factor == -2.0 and torch.equal(again.decode(z), images)
    with pytest.raises(ValueError, match="differs from shift_factor"):
        get_codec("pixels:2:5:-2", shift_factor=1.0)
    with pytest.raises(ValueError, match="SHIFT must be a number"):
        get_codec("pixels:2:5:up")
    with pytest.raises(ValueError, match="needs a SCALE"):
        get_codec("pixels:2::1")
    with pytest.raises(ValueError, match="shift_factor must be finite"):
        get_codec("pixels:2:5:nan")


def test_codec_accepts_numpy_and_keeps_the_input_device():
    images = _images().numpy()
    z = get_codec("pixels").encode(images)
    assert z.device.type == "cpu" and z.shape == (3, 3, 32, 32)


def test_codec_input_errors_name_the_problem():
    codec = get_codec("pixels:4")
    with pytest.raises(TypeError, match="uint8"):
        codec.encode(torch.zeros(1, 32, 32, 3))
    with pytest.raises(ValueError, match=r"\(N, H, W, 3\)"):
        codec.encode(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match="multiple of .* 4"):
        codec.encode(torch.zeros(1, 30, 32, 3, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"\(N, 48, h, w\)"):
        codec.decode(torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError, match="pixels:F"):
        get_codec("pixels:two")
    with pytest.raises(ValueError, match="positive"):
        get_codec("pixels:0")


def test_missing_codec_path_is_named(tmp_path):
    missing = tmp_path / "no-such-vae"
    with pytest.raises(FileNotFoundError, match="no-such-vae"):
        get_codec(str(missing))


# ------------------------------------------------------------------------------ AutoencoderKL

def _tiny_vae(path, latent_channels=4, scaling_factor=0.5, shift_factor=None, seed=0):
    from diffusers import AutoencoderKL
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16), layers_per_block=1, latent_channels=latent_channels,
        norm_num_groups=4, sample_size=16, scaling_factor=scaling_factor, shift_factor=shift_factor,
        mid_block_add_attention=False)
    vae.save_pretrained(path)
    return vae.eval()


@pytest.fixture(scope="module")
def tiny_vae(tmp_path_factory):
    path = tmp_path_factory.mktemp("vae4")
    return path, _tiny_vae(path)


@pytest.fixture(scope="module")
def tiny_vae16(tmp_path_factory):
    # The 16-channel kind (Flux, Ostris) has a shift factor as well as a scale.
    path = tmp_path_factory.mktemp("vae16")
    return path, _tiny_vae(path, latent_channels=16, scaling_factor=0.3611, shift_factor=0.1159, seed=1)


def _reference_latents(vae, images):
    x = images.permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        return vae.encode(x).latent_dist.mean


@needs_diffusers
def test_vae_encode_decode_shapes_and_scaling(tiny_vae):
    path, vae = tiny_vae
    codec = get_codec(str(path))
    assert (codec.channels, codec.downsample, codec.scaling_factor, codec.shift_factor) == (4, 2, 0.5, 0.0)
    images = _images(n=2, size=16)
    z = codec.encode(images)
    assert z.dtype == torch.float32 and z.shape == (2, 4, 8, 8)
    torch.testing.assert_close(z, _reference_latents(vae, images) * 0.5)
    out = codec.decode(z)
    assert out.dtype == torch.uint8 and out.shape == images.shape
    with torch.no_grad():
        ref = vae.decode(z / 0.5).sample
    expected = ((ref.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1)
    assert (out.int() - expected.int()).abs().max() <= 1


@needs_diffusers
def test_vae_shift_factor_is_honoured(tiny_vae16):
    path, vae = tiny_vae16
    codec = get_codec("vae:" + str(path))
    assert (codec.channels, codec.scaling_factor, codec.shift_factor) == (16, 0.3611, 0.1159)
    images = _images(n=2, size=16)
    z = codec.encode(images)
    assert z.shape == (2, 16, 8, 8)
    torch.testing.assert_close(z, (_reference_latents(vae, images) - 0.1159) * 0.3611)
    with torch.no_grad():
        ref = vae.decode(z / 0.3611 + 0.1159).sample
    expected = ((ref.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1)
    assert (codec.decode(z).int() - expected.int()).abs().max() <= 1


@needs_diffusers
def test_vae_sample_option(tiny_vae):
    path, _ = tiny_vae
    mean_codec, sample_codec = get_codec(str(path)), get_codec(str(path), sample=True)
    images = _images(n=1, size=16)
    a = sample_codec.encode(images, generator=torch.Generator().manual_seed(0))
    b = sample_codec.encode(images, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and not torch.equal(a, mean_codec.encode(images))


@needs_diffusers
def test_vae_metadata_round_trip(tiny_vae16):
    path, _ = tiny_vae16
    codec = get_codec(str(path))
    meta = _json_round_trip(codec.metadata())
    assert meta["kind"] == "autoencoder_kl" and meta["spec"] == str(path.resolve())
    again = codec_from_metadata(meta)
    assert again.metadata() == codec.metadata()
    images = _images(n=1, size=16)
    torch.testing.assert_close(again.encode(images), codec.encode(images))
    with pytest.raises(ValueError, match="channels: 4 recorded, 16 now"):
        codec_from_metadata({**meta, "channels": 4})


@needs_diffusers
def test_vae_metadata_keeps_the_recorded_factors(tiny_vae):
    path, _ = tiny_vae
    meta = get_codec(str(path), scaling_factor=0.25).metadata()
    assert codec_from_metadata(meta).scaling_factor == 0.25


@needs_diffusers
def test_vae_in_a_pipeline_folder(tmp_path, tiny_vae):
    _, vae = tiny_vae
    vae.save_pretrained(tmp_path / "pipe" / "vae")
    codec = get_codec(str(tmp_path / "pipe"))
    assert codec.channels == 4 and codec.spec == str((tmp_path / "pipe" / "vae").resolve())


@needs_diffusers
def test_vae_folder_errors_name_the_folder(tmp_path, tiny_vae):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="empty is not a diffusers AutoencoderKL folder"):
        get_codec(str(empty))
    unet = tmp_path / "unet"
    unet.mkdir()
    (unet / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel"}))
    with pytest.raises(ValueError, match="unet is not an AutoencoderKL.*UNet2DModel"):
        get_codec(str(unet))
    single = tmp_path / "vae.safetensors"
    single.write_bytes(b"")
    with pytest.raises(ValueError, match="single file"):
        get_codec(str(single))


@needs_diffusers
@pytest.mark.filterwarnings("ignore:The `local_dir_use_symlinks` argument is deprecated")
def test_vae_hub_id_offline_gives_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError, match="'nobody-here/no-such-vae'.*HF_HOME"):
        get_codec("nobody-here/no-such-vae")
