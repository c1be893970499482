"""benches/demo_noise_probe.py: token kinds, and the noise it reports left by known denoisers."""
import pytest
import torch

from benches import demo_noise_probe as probe
from microdit.diffusion import edm

SD = 0.9


def _latents(batch=4):
    x0 = torch.zeros(batch, 3, 8, 8)
    x0[:, :, 2:6, 2:6] = 3.0  # one 4 x 4 object, on a 2-patch grid exactly 4 tokens
    x0[:, 1, 2:6, 2:6] = -2.5
    return x0


def test_token_kinds():
    obj, bg = probe.token_kinds(_latents(), 2)
    assert obj.shape == (4, 16) and int(obj[0].sum()) == 4 and int(bg[0].sum()) == 12
    assert not bool((obj & bg).any())


class Zero(torch.nn.Module):
    def forward(self, x, c_noise, y):
        return torch.zeros_like(x)


class Oracle(torch.nn.Module):
    """F such that D(x; sigma) = x0 exactly (it knows the clean latents)."""

    def __init__(self, x0):
        super().__init__()
        self.x0 = x0

    def forward(self, x_in, c_noise, y):
        sigma = torch.exp(4 * c_noise).reshape(-1, 1, 1, 1)
        c_skip, c_out, c_in, _ = edm.precondition(sigma, SD)
        return (self.x0 - c_skip * x_in / c_in) / c_out


def test_zero_network_leaves_c_skip_of_the_noise():
    x0 = _latents(512)  # objects: the clean part of the error averages out over many tokens
    report = probe.noise_probe(Zero(), x0, None, sigma_data=SD, patch_size=2, sigmas=(0.3, 2.0))
    for s in (0.3, 2.0):
        c_skip = SD**2 / (s**2 + SD**2)
        row = report["sigmas"][str(s)]
        assert row["background"]["noise_left"] == pytest.approx(c_skip, abs=2e-3)
        assert row["object"]["noise_left"] == pytest.approx(c_skip, abs=0.05)
        assert "ln_input_std" not in row["object"]  # no final_layer to hook


def test_oracle_removes_all_noise():
    x0 = _latents()
    report = probe.noise_probe(Oracle(x0), x0, None, sigma_data=SD, patch_size=2, to_255=127.5 / 5)
    for row in report["sigmas"].values():
        for kind in ("object", "background"):
            assert abs(row[kind]["noise_left"]) < 1e-3 and row[kind]["rms_err"] < 1e-2
    assert report["object_tokens"] == 16 and report["background_tokens"] == 48


def test_missing_run_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoints"):
        probe.probe_checkpoint(str(tmp_path))


def test_offset_shifts_the_clean_latents_but_not_the_token_kinds():
    x0 = _latents()
    # An oracle of the shifted latents removes all the noise; the token counts are the unshifted ones.
    report = probe.noise_probe(Oracle(x0 + 1.5), x0, None, sigma_data=SD, patch_size=2, offset=1.5)
    assert report["object_tokens"] == 16 and report["background_tokens"] == 48
    for row in report["sigmas"].values():
        assert abs(row["background"]["noise_left"]) < 1e-3
    # The unshifted oracle is now wrong by the offset everywhere.
    report = probe.noise_probe(Oracle(x0), x0, None, sigma_data=SD, patch_size=2, offset=1.5, sigmas=(1.0,))
    assert report["sigmas"]["1.0"]["background"]["rms_err"] == pytest.approx(1.5, rel=1e-4)


def test_grid_decodes_each_row(tmp_path):
    from PIL import Image

    from microdit.data.codecs import get_codec

    codec = get_codec("pixels:2:5")
    z = torch.zeros(8, 12, 4, 4)
    denoised = []
    probe.noise_probe(Zero(), z, None, sigma_data=SD, patch_size=2, sigmas=(1.0, 2.0), denoised=denoised)
    assert len(denoised) == 2 and denoised[0].shape == z.shape
    probe._grid(str(tmp_path / "g.png"), [z] + denoised, codec.metadata())
    im = Image.open(tmp_path / "g.png")
    assert im.size == (8 * 8 * 4, 3 * 8 * 4)
    assert im.getpixel((0, 0)) == (128, 128, 128)  # the clean row: latents 0 are mid grey
