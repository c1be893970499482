"""EDM diffusion (Karras et al. 2022) as MicroDiT uses it: preconditioning, loss, Heun sampler."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..ops.keep_indices import drop_mask, keep_indices


@dataclass(frozen=True)
class EDMConfig:
    sigma_data: float = 0.9
    P_mean: float = -0.6  # (0, 0.6) at 512 px
    P_std: float = 1.2
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    rho: float = 7.0


DEFAULT = EDMConfig()


def precondition(sigma: torch.Tensor, sigma_data: float = DEFAULT.sigma_data):
    """(c_skip, c_out, c_in, c_noise) for noise level `sigma` (any shape)."""
    sd2 = sigma_data**2
    c_skip = sd2 / (sigma**2 + sd2)
    c_out = sigma * sigma_data / (sigma**2 + sd2).sqrt()
    c_in = 1 / (sd2 + sigma**2).sqrt()
    c_noise = sigma.log() / 4
    return c_skip, c_out, c_in, c_noise


def denoise(model, x, sigma, y, *, sigma_data: float = DEFAULT.sigma_data, **model_kw):
    """D(x; sigma) = c_skip x + c_out F(c_in x, c_noise, y). `sigma` is a scalar or (B,)-like."""
    sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).reshape(-1, 1, 1, 1)
    c_skip, c_out, c_in, c_noise = precondition(sigma, sigma_data)
    F_x = model(c_in * x, c_noise.reshape(-1), y, **model_kw)  # (B, C, H, W)
    return c_skip * x + c_out * F_x.to(x.dtype)


def patch_mean(err: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, T): mean over channels and each p x p patch, tokens row-major."""
    return F.avg_pool2d(err.mean(dim=1, keepdim=True), patch_size).flatten(1)


def loss(model, x0, y, *, mask_ratio: float = 0.0, rnd_normal=None, noise=None, ids_keep=None,
         caption_dropout: float = 0.0, config: EDMConfig = DEFAULT, generator=None, return_terms: bool = False,
         model_config=None):
    """EDM training loss. With masking, only kept patches count (per-sample mean, then batch mean).

    `rnd_normal` (B, 1, 1, 1) and `noise` (unit variance, shape of x0) fix the randomness;
    `ids_keep` (B, K) fixes the kept tokens. `caption_dropout` zeroes that fraction of captions.
    `model_config` is needed only when `model` is wrapped (DDP, FSDP, torch.compile).
    """
    mcfg = model_config or model.config
    B = x0.shape[0]
    if rnd_normal is None:
        rnd_normal = torch.randn(B, 1, 1, 1, device=x0.device, generator=generator)
    if noise is None:
        noise = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=generator)
    if caption_dropout > 0:
        keep = torch.rand(B, device=y.device, generator=generator) >= caption_dropout
        y = y * keep.view(B, *([1] * (y.dim() - 1))).to(y.dtype)
    sigma = (rnd_normal * config.P_std + config.P_mean).exp()  # (B, 1, 1, 1)
    weight = (sigma**2 + config.sigma_data**2) / (sigma * config.sigma_data) ** 2
    p = mcfg.patch_size
    T = (x0.shape[2] // p) * (x0.shape[3] // p)
    if ids_keep is None and mask_ratio > 0:
        ids_keep = keep_indices(B, T, mask_ratio, x0.device, generator,
                                           backend=mcfg.backends.get("keep_indices"))
    D_x = denoise(model, x0 + noise * sigma, sigma, y, sigma_data=config.sigma_data, ids_keep=ids_keep)
    err = weight * (D_x - x0) ** 2  # (B, C, H, W)
    if ids_keep is None:
        value = err.mean()
    else:
        kept = 1.0 - drop_mask(ids_keep, T)  # (B, T)
        per_patch = patch_mean(err, p)  # (B, T)
        value = ((per_patch * kept).sum(dim=1) / kept.sum(dim=1)).mean()
    if return_terms:
        return value, {"sigma": sigma.flatten(), "ids_keep": ids_keep}
    return value


def sigma_steps(steps: int, config: EDMConfig = DEFAULT, device=None) -> torch.Tensor:
    """Karras step sigmas (float64), then a final 0."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    i = torch.arange(steps, dtype=torch.float64, device=device)
    lo, hi = config.sigma_min ** (1 / config.rho), config.sigma_max ** (1 / config.rho)
    t = (hi + i / max(steps - 1, 1) * (lo - hi)) ** config.rho
    return torch.cat([t, torch.zeros_like(t[:1])])


@torch.no_grad()
def sample(model, noise, y, *, steps: int = 30, guidance: float = 5.0, config: EDMConfig = DEFAULT,
           callback=None):
    """Deterministic EDM Heun sampler from unit-variance `noise`; returns the final latents (float32).

    The loop state is float64; network calls are float32. The step into sigma 0 is Euler.
    """
    t_steps = sigma_steps(steps, config, noise.device)
    x_next = noise.to(torch.float64) * t_steps[0]
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
        x_cur = x_next
        d_cur = (x_cur - _denoise64(model, x_cur, t_cur, y, guidance, config)) / t_cur
        x_next = x_cur + (t_next - t_cur) * d_cur
        if i < steps - 1:
            d_prime = (x_next - _denoise64(model, x_next, t_next, y, guidance, config)) / t_next
            x_next = x_cur + (t_next - t_cur) * (0.5 * d_cur + 0.5 * d_prime)
        if callback is not None:
            callback(i, x_next)
    return x_next.to(torch.float32)


def _denoise64(model, x64, sigma64, y, guidance, config):
    x = x64.to(torch.float32)
    sigma = sigma64.to(torch.float32)
    return denoise(model, x, sigma, y, sigma_data=config.sigma_data, guidance=guidance).to(torch.float64)
