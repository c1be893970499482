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
