"""EDM diffusion (Karras et al. 2022) as MicroDiT uses it: preconditioning, loss, Heun sampler."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..ops.keep_indices import drop_mask


@dataclass(frozen=True)
class EDMConfig:
    sigma_data: float = 0.9
    P_mean: float = -0.6  # (0, 0.6) at 512 px
    P_std: float = 1.2
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    rho: float = 7.0
    # Not in the paper (1.0: off, the published loss): tokens whose clean latents stand out from
    # their image's background (the per-channel median) by more than foreground_threshold *
    # sigma_data count foreground_weight times as much in the loss. For sparse images (a few
    # small objects on a flat background) whose objects' tokens are rare. Only samples noised to
    # sigma >= foreground_sigma_min are weighted (0: all); below it every token weighs the same,
    # so the background keeps its share of the low-noise loss, where its noise is removed.
    foreground_weight: float = 1.0
    foreground_threshold: float = 1.0
    foreground_sigma_min: float = 0.0


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


def foreground_tokens(x0: torch.Tensor, patch_size: int, threshold: float) -> torch.Tensor:
    """(B, C, H, W) clean latents -> (B, T) float: 1 where some value of the token's patch differs
    from its image's background (the per-channel median) by more than `threshold`, else 0."""
    background = x0.flatten(2).median(dim=2).values[:, :, None, None]
    far = ((x0 - background).abs() > threshold).amax(dim=1, keepdim=True).to(x0.dtype)
    return F.max_pool2d(far, patch_size).flatten(1)


def patch_mean(err: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, T): mean over channels and each p x p patch, tokens row-major."""
    return F.avg_pool2d(err.mean(dim=1, keepdim=True), patch_size).flatten(1)


@dataclass(frozen=True)
class StepRandomness:
    """Everything random in one training step, drawn by `draw_step` (the one place it is drawn).

    rnd_normal (B, 1, 1, 1) standard normals (sigma = exp(P_mean + P_std * rnd_normal)); noise
    (unit variance, the latents' shape); caption_keep (B,) bool or None (no caption dropout);
    ids_keep (B, K) kept tokens or None (no masking), on a grid of `patch_size` patches.
    """

    rnd_normal: torch.Tensor
    noise: torch.Tensor
    ids_keep: torch.Tensor | None
    patch_size: int
    caption_keep: torch.Tensor | None = None

    def __getitem__(self, part: slice) -> "StepRandomness":
        """The samples `part` of the batch (e.g. one rank's share of a global micro-batch)."""
        pick = lambda t: None if t is None else t[part]
        return StepRandomness(self.rnd_normal[part], self.noise[part], pick(self.ids_keep), self.patch_size,
                              pick(self.caption_keep))


def draw_step(batch: int, shape, *, patch_size: int, mask_ratio: float = 0.0, caption_dropout: float = 0.0,
              ops=None, device=None, dtype=None, generator=None, rnd_normal=None, noise=None,
              ids_keep=None) -> StepRandomness:
    """A training step's randomness for `batch` latents of `shape` (C, H, W), drawn in this fixed
    order from `generator`: rnd_normal, noise (`dtype`, default torch's), the caption-dropout
    draw (when `caption_dropout` > 0), then the kept tokens (when `mask_ratio` > 0) through
    `ops.keep_indices` (an ops.opset.OpSet: the model's, so one backend choice serves every
    caller; default: built from MICRODIT_BACKEND). Pieces given are used instead of drawn."""
    if rnd_normal is None:
        rnd_normal = torch.randn(batch, 1, 1, 1, device=device, generator=generator)
    if noise is None:
        noise = torch.randn(batch, *shape, device=device, dtype=dtype, generator=generator)
    caption_keep = None
    if caption_dropout > 0:
        caption_keep = torch.rand(batch, device=device, generator=generator) >= caption_dropout
    if ids_keep is None and mask_ratio > 0:
        if ops is None:
            from ..ops.opset import build_ops

            ops = build_ops()
        T = (shape[-2] // patch_size) * (shape[-1] // patch_size)
        ids_keep = ops.keep_indices(batch, T, mask_ratio, device, generator)
    return StepRandomness(rnd_normal, noise, ids_keep, patch_size, caption_keep)


def loss(model, x0, y, *, step: StepRandomness | None = None, mask_ratio: float = 0.0, rnd_normal=None,
         noise=None, ids_keep=None, caption_dropout: float = 0.0, config: EDMConfig = DEFAULT, generator=None,
         return_terms: bool = False):
    """EDM training loss. With masking, only kept patches count (per-sample mean, then batch mean).

    `step` (from `draw_step`) fixes all the randomness; so do, piece by piece, `rnd_normal`
    (B, 1, 1, 1), `noise` (unit variance, shape of x0) and `ids_keep` (B, K), the rest being drawn
    from `generator` as `draw_step` does. `caption_dropout` zeroes that fraction of captions.
    Without `step`, `model` must be a MicroDiT (its config and ops); a wrapped model (DDP, FSDP,
    torch.compile, a function) needs `step`.
    """
    B = x0.shape[0]
    if step is None:
        if not hasattr(model, "config") or not hasattr(model, "ops"):
            raise TypeError(f"edm.loss: {type(model).__name__} is not a MicroDiT: pass step=edm.draw_step(...) "
                            "with the model's patch size and ops")
        step = draw_step(B, x0.shape[1:], patch_size=model.config.patch_size, mask_ratio=mask_ratio,
                         caption_dropout=caption_dropout, ops=model.ops, device=x0.device, dtype=x0.dtype,
                         generator=generator, rnd_normal=rnd_normal, noise=noise, ids_keep=ids_keep)
    if step.caption_keep is not None:
        y = y * step.caption_keep.view(B, *([1] * (y.dim() - 1))).to(y.device, y.dtype)
    sigma = (step.rnd_normal * config.P_std + config.P_mean).exp()  # (B, 1, 1, 1)
    weight = (sigma**2 + config.sigma_data**2) / (sigma * config.sigma_data) ** 2
    p, ids_keep = step.patch_size, step.ids_keep
    T = (x0.shape[2] // p) * (x0.shape[3] // p)
    D_x = denoise(model, x0 + step.noise * sigma, sigma, y, sigma_data=config.sigma_data, ids_keep=ids_keep)
    err = weight * (D_x - x0) ** 2  # (B, C, H, W)
    if ids_keep is None and config.foreground_weight == 1.0:
        value = err.mean()
    else:
        kept = torch.ones(B, T, device=x0.device, dtype=err.dtype) if ids_keep is None \
            else 1.0 - drop_mask(ids_keep, T)  # (B, T)
        if config.foreground_weight != 1.0:
            fg = foreground_tokens(x0.detach(), p, config.foreground_threshold * config.sigma_data)
            if config.foreground_sigma_min > 0:
                fg = fg * (sigma.reshape(B, 1) >= config.foreground_sigma_min).to(fg.dtype)
            kept = kept * (1.0 + (config.foreground_weight - 1.0) * fg.to(kept.dtype))
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
           callback=None, churn: float = 0.0, churn_sigmas: tuple[float, float] = (0.05, 50.0),
           churn_noise: float = 1.003, generator: torch.Generator | None = None):
    """EDM Heun sampler from unit-variance `noise`; returns the final latents (float32).

    The loop state is float64; network calls are float32. The step into sigma 0 is Euler.
    `churn` > 0 is EDM's stochastic sampler (Karras et al. 2022, Algorithm 2): at each step with
    sigma in `churn_sigmas`, noise is first raised by the factor 1 + min(churn / steps, sqrt(2) - 1)
    with fresh noise (scaled by `churn_noise`) drawn from `generator`, which corrects some of an
    imperfect denoiser's errors; 0 (the default) is the deterministic sampler, exactly.
    """
    if churn < 0:
        raise ValueError(f"churn must be >= 0, got {churn}")
    t_steps = sigma_steps(steps, config, noise.device)
    x_next = noise.to(torch.float64) * t_steps[0]
    gamma_max = min(churn / steps, 2**0.5 - 1)
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
        x_cur = x_next
        if churn > 0 and churn_sigmas[0] <= t_cur <= churn_sigmas[1]:
            t_hat = t_cur * (1 + gamma_max)
            eps = torch.randn(x_cur.shape, generator=generator, device=x_cur.device, dtype=torch.float32)
            x_cur = x_cur + (t_hat**2 - t_cur**2).sqrt() * churn_noise * eps.to(torch.float64)
            t_cur = t_hat
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
