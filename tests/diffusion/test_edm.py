"""EDM preconditioning, loss and sampler behaviour."""
import math

import pytest
import torch

import microdit
from microdit import edm
from benches.demo_testbed import Oracle
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


def test_foreground_tokens_and_weighted_loss(model):
    import dataclasses
    g = torch.Generator().manual_seed(2)
    x0 = torch.zeros(3, 4, 8, 8)
    x0[0, :, 0:3, 0:3] = 2.5  # an object over tokens 0, 1, 4, 5 (edges count)
    x0[1, 1, 6, 7] = -2.0  # one value of token 15
    x0[2] += 0.3 * torch.rand(4, 8, 8, generator=g)  # texture within 0.3, no object
    fg = edm.foreground_tokens(x0, 2, 0.9)
    want = torch.zeros(3, 16)
    want[0, [0, 1, 4, 5]] = 1
    want[1, 15] = 1
    assert torch.equal(fg, want)
    y = torch.randn(3, 5, 32, generator=g)
    rnd, noise = torch.randn(3, 1, 1, 1, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    keep = keep_indices(3, 16, 0.5, generator=g)
    cfg = dataclasses.replace(edm.DEFAULT, foreground_weight=5.0)
    with torch.no_grad():
        # Weight 1 is the published loss, masked or not.
        one = dataclasses.replace(edm.DEFAULT, foreground_weight=1.0)
        for ids in (None, keep):
            torch.testing.assert_close(edm.loss(model, x0, y, rnd_normal=rnd, noise=noise, ids_keep=ids, config=one),
                                       edm.loss(model, x0, y, rnd_normal=rnd, noise=noise, ids_keep=ids))
        loss = edm.loss(model, x0, y, rnd_normal=rnd, noise=noise, ids_keep=keep, config=cfg)
        sigma = (rnd * 1.2 - 0.6).exp()
        D = edm.denoise(model, x0 + noise * sigma, sigma, y, ids_keep=keep)
        per_patch = edm.patch_mean((sigma**2 + 0.81) / (sigma * 0.9) ** 2 * (D - x0) ** 2, 2)
        per_sample = []
        for b in range(3):
            w = torch.tensor([5.0 if want[b, t] else 1.0 for t in keep[b].tolist()])
            per_sample.append((per_patch[b, keep[b]] * w).sum() / w.sum())
        torch.testing.assert_close(loss, torch.stack(per_sample).mean())
        # foreground_sigma_min: samples noised below it weigh every kept token alike. Sample 0 (the
        # object) gets the lowest sigma, under the cut; samples 1 and 2 stay above it.
        rnd2 = rnd.clone()
        rnd2[0] = -3.0
        sigma2 = (rnd2 * 1.2 - 0.6).exp()
        cut = float(sigma2[0]) * 1.01
        assert (sigma2.flatten()[1:] > cut).all()
        part = edm.loss(model, x0, y, rnd_normal=rnd2, noise=noise, ids_keep=keep,
                        config=dataclasses.replace(cfg, foreground_sigma_min=cut))
        full = edm.loss(model, x0, y, rnd_normal=rnd2, noise=noise, ids_keep=keep, config=cfg)
        D = edm.denoise(model, x0 + noise * sigma2, sigma2, y, ids_keep=keep)
        per_patch = edm.patch_mean((sigma2**2 + 0.81) / (sigma2 * 0.9) ** 2 * (D - x0) ** 2, 2)
        want_part = [per_patch[0, keep[0]].mean()]
        for b in (1, 2):
            w = torch.tensor([5.0 if want[b, t] else 1.0 for t in keep[b].tolist()])
            want_part.append((per_patch[b, keep[b]] * w).sum() / w.sum())
        torch.testing.assert_close(part, torch.stack(want_part).mean())
        assert not torch.allclose(part, full)  # sample 0's object was weighted without the cut


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


def test_sampler_with_the_exact_denoiser_draws_dataset_images():
    """Given the ideal denoiser, the Heun sampler must end on the dataset's images themselves: one
    coherent object each, not a mixture of token-sized pieces (issue 14's blotchy samples are the
    network's, not the sampler's). 40 scenes of one 4x4 square on an 8x8 grid, 3 colours."""
    scenes = []
    for colour in torch.tensor([[1.5, -1.0, -1.0], [-1.0, 1.5, -1.0], [-1.0, -1.0, 1.5]]):
        for y0 in range(0, 5, 2):
            for x0 in range(0, 5):
                img = torch.full((3, 8, 8), -0.3)
                img[:, y0:y0 + 4, x0:x0 + 4] = colour[:, None, None]
                scenes.append(img)
    images = torch.stack(scenes)  # (45, 3, 8, 8)
    oracle = Oracle(images, sigma_data=0.9)  # the exact posterior mean over `images`
    noise = torch.randn(24, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    out = edm.sample(oracle, noise, None, steps=20, guidance=1.0)
    dist = torch.cdist(out.double().flatten(1), images.double().flatten(1))  # (24, 45)
    nearest = dist.min(dim=1)
    assert nearest.values.max() < 0.05, nearest.values.max()  # every sample is one dataset image
    assert len(set(nearest.indices.tolist())) >= 8  # and they are not all the same one


class GaussianDenoiser(torch.nn.Module):
    """Exact denoiser of data ~ N(0, s^2 I): D(x; sigma) = s^2 / (s^2 + sigma^2) x, as F."""

    def __init__(self, s: float, sigma_data: float):
        super().__init__()
        self.s, self.sigma_data = s, sigma_data

    def forward(self, x_in, c_noise, y, guidance=1.0, **kw):
        sigma = (c_noise.double() * 4).exp().reshape(-1, 1, 1, 1)
        c_skip, c_out, c_in, _ = edm.precondition(sigma, self.sigma_data)
        x = x_in.double() / c_in
        return ((self.s**2 / (self.s**2 + sigma**2) * x - c_skip * x) / c_out).to(x_in.dtype)


@pytest.mark.parametrize("s", [0.3, 0.9, 2.0])
def test_sampler_follows_the_probability_flow_ode(s):
    """For Gaussian data the probability-flow ODE is solved in closed form: x(0) = x(sigma_max) s /
    sqrt(s^2 + sigma_max^2). Heun must converge to it at second order (error / 4 per doubling of
    the steps: a wrong step, weight or sign does not), and be within 0.4% at 80 steps."""
    noise = torch.randn(4, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    exact = noise.double() * 80.0 * s / math.sqrt(s**2 + 80.0**2)

    def error(steps):
        out = edm.sample(GaussianDenoiser(s, 0.9), noise, None, steps=steps, guidance=1.0)
        return ((out.double() - exact).abs().max() / exact.abs().max()).item()

    e20, e40, e80 = error(20), error(40), error(80)
    assert e80 < 4e-3, (e20, e40, e80)
    assert 3.0 < e20 / e40 < 5.5 and 3.0 < e40 / e80 < 5.5, (e20, e40, e80)


def test_stochastic_sampler_keeps_the_data_distribution_and_is_seeded():
    """churn > 0 (EDM's Algorithm 2) with the exact denoiser of N(0, s^2) data still ends with std s;
    the same generator seed gives the same samples; churn 0 is the deterministic sampler exactly."""
    s, noise = 0.9, torch.randn(64, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    oracle = GaussianDenoiser(s, 0.9)
    run = lambda seed, churn, steps=40: edm.sample(oracle, noise, None, steps=steps, guidance=1.0, churn=churn,
                                                   generator=torch.Generator().manual_seed(seed))
    a, b, c = run(1, 40.0), run(1, 40.0), run(2, 40.0)
    assert torch.equal(a, b) and not torch.equal(a, c)
    # The stochastic steps add discretisation error (std 4% high at 40 steps); it vanishes with steps.
    assert abs(run(1, 160.0, 160).std().item() - s) < 0.02 * s
    deterministic = edm.sample(oracle, noise, None, steps=40, guidance=1.0)
    assert torch.equal(run(1, 0.0), deterministic) and not torch.equal(a, deterministic)
    with pytest.raises(ValueError, match="churn"):
        run(1, -1.0)
