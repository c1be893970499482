"""benches/demo_testbed.py: the exact denoiser and the scattered-pieces measure it compares models with."""
import torch
import torch.nn.functional as F

from benches import demo_testbed as tb
from microdit.diffusion import edm


def test_templates_are_every_placement_of_one_square():
    images = tb.templates()
    assert images.shape == (8 * 20 * 20, 12, 16, 16)
    pixels = F.pixel_shuffle(images / tb.SCALE, 2)  # (N, 3, 32, 32)
    fg = pixels.abs().amax(dim=1) > 0.25
    assert (fg.flatten(1).sum(1) == 144).all()  # one 12 x 12 square each (no palette colour is grey)
    assert len({tuple(p.flatten().tolist()) for p in pixels[::97]}) == len(pixels[::97])  # all distinct


def test_oracle_denoises_exactly_at_low_noise_and_draws_clean_squares():
    images = tb.templates()
    oracle = tb.Oracle(images)
    g = torch.Generator().manual_seed(0)
    x0 = images[torch.randint(0, len(images), (8,), generator=g)]
    noisy = x0 + torch.randn(x0.shape, generator=g) * 1.0
    assert ((edm.denoise(oracle, noisy, 1.0, None) - x0) ** 2).mean() < 1e-4
    z = edm.sample(oracle, torch.randn(6, 12, 16, 16, generator=g), None, steps=20, guidance=1.0)
    assert tb.scattered_fraction(F.pixel_shuffle(z / tb.SCALE, 2)) < 0.01


def test_scattered_fraction_flags_token_sized_pieces():
    clean = F.pixel_shuffle(tb.templates()[:4] / tb.SCALE, 2)
    assert tb.scattered_fraction(clean) == 0.0
    pieces = clean.clone()
    pieces[:, :, 28:32, 0:4] = 1.0  # two 4 x 4 px squares away from the object
    pieces[:, :, 0:4, 28:32] = 1.0
    assert abs(tb.scattered_fraction(pieces) - 32 / (144 + 32)) < 0.02


def test_run_masks_on_the_models_own_patch_grid():
    # patch_size=4 has 16 tokens: masking must draw its keep indices on that grid, not on the
    # 64-token grid of patch 2 (which would index past the model's tokens).
    result = tb.run("microdit", steps=1, batch=2, lr=1e-3, mask_ratio=0.5, P_mean=1.0, P_std=1.6, seed=0,
                    out=None, overrides={"patch_size": 4, "dim": 32, "patch_mixer_dim": 32, "head_dim": 16,
                                         "depth": 2, "patch_mixer_depth": 1})
    assert result["steps"] == 1 and result["overrides"]["patch_size"] == 4
