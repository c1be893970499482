"""EDM preconditioning, loss and sampler behaviour."""
import math

import pytest
import torch

import microdit
from microdit import edm
from microdit.ops.keep_indices import keep_indices


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = microdit.create_model("MicroDiT_Test_2").eval()
    with torch.no_grad():  # non-zero output layer so F depends on its inputs
        for p in m.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.05)
    return m


def test_preconditioning_values():
    c_skip, c_out, c_in, c_noise = edm.precondition(torch.tensor(0.9))
    assert c_skip == pytest.approx(0.5) and c_out == pytest.approx(0.81 / math.sqrt(1.62))
    assert c_in == pytest.approx(1 / math.sqrt(1.62)) and c_noise == pytest.approx(math.log(0.9) / 4)


def test_sigma_steps():
    s = edm.sigma_steps(6)
    assert s.dtype == torch.float64 and len(s) == 7 and s[-1] == 0
    assert s[0].item() == pytest.approx(80.0) and s[5].item() == pytest.approx(0.002)
    assert torch.all(s[:-1][1:] < s[:-1][:-1])


def test_masked_loss_is_mean_over_kept_patches(model):
    g = torch.Generator().manual_seed(1)
    x0, y = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 5, 32, generator=g)
    rnd, noise = torch.randn(3, 1, 1, 1, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    keep = keep_indices(3, 16, 0.75, generator=g)
    with torch.no_grad():
        loss = edm.loss(model, x0, y, rnd_normal=rnd, noise=noise, ids_keep=keep)
        sigma = (rnd * 1.2 - 0.6).exp()
        D = edm.denoise(model, x0 + noise * sigma, sigma, y, ids_keep=keep)
        w = (sigma**2 + 0.81) / (sigma * 0.9) ** 2
        err = (w * (D - x0) ** 2).mean(1)  # (B, H, W)
        per_sample = []
        for b in range(3):
            vals = [err[b, 2 * (t // 4):2 * (t // 4) + 2, 2 * (t % 4):2 * (t % 4) + 2].mean() for t in keep[b].tolist()]
            per_sample.append(torch.stack(vals).mean())
    torch.testing.assert_close(loss, torch.stack(per_sample).mean())


def test_loss_random_masking_and_backward():
    m = microdit.create_model("MicroDiT_Test_2")
    x0, y = torch.randn(2, 4, 8, 8), torch.randn(2, 5, 32)
    loss = edm.loss(m, x0, y, mask_ratio=0.75, generator=torch.Generator().manual_seed(0))
    loss.backward()
    assert torch.isfinite(loss) and m.final_layer.linear.weight.grad.abs().sum() > 0


def test_caption_dropout(model):
    g = torch.Generator().manual_seed(2)
    x0, y = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 5, 32, generator=g)
    kw = dict(rnd_normal=torch.randn(2, 1, 1, 1, generator=g), noise=torch.randn(2, 4, 8, 8, generator=g))
    with torch.no_grad():
        dropped = edm.loss(model, x0, y, caption_dropout=1.0, **kw)
        zero = edm.loss(model, x0, torch.zeros_like(y), **kw)
        kept = edm.loss(model, x0, y, caption_dropout=0.0, **kw)
    assert dropped == zero and kept != zero


def test_sampler_deterministic_and_guidance(model):
    g = torch.Generator().manual_seed(3)
    noise, y = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 5, 32, generator=g)
    a = edm.sample(model, noise, y, steps=4, guidance=3.0)
    b = edm.sample(model, noise, y, steps=4, guidance=3.0)
    c = edm.sample(model, noise, y, steps=4, guidance=1.0)
    assert torch.equal(a, b) and not torch.allclose(a, c) and torch.isfinite(a).all()
    one = edm.sample(model, noise, y, steps=1, guidance=1.0)  # a single Euler step to sigma 0
    with torch.no_grad():
        expect = edm.denoise(model, noise * 80.0, torch.tensor(80.0), y)
    torch.testing.assert_close(one, expect, rtol=1e-5, atol=1e-5)
