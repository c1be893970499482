"""Issue 14's controlled testbed: is it the code or the budget that keeps the tokens from agreeing?

One unconditional task small enough to have an exact answer: 32 px images of one 12 x 12 px square
of a palette colour at a random place on grey, in the demo's latent space (`pixels:2`, x2.5:
12 x 16 x 16, 64 tokens of 4 x 4 px). Its exact denoiser (the posterior mean over the 3,200
possible images) is computed in closed form, so each model's denoising error per noise level can
be set beside the ideal, and the sampler can be run with the ideal denoiser. Models, each trained
with the library's EDM loss and sampled with its Heun sampler:

- `microdit`: MicroDiT_Micro_2 (the demo's model: patch-mixer, MoE, layer-wise scaling);
- `plain`: a plain DiT of the same width and token grid (pre-LN blocks, adaLN-zero, SDPA, no
  mixer / MoE / QK-norm / cross-attention): shows whether MicroDiT's own parts are the cause;
- `token-mlp`: a per-token MLP (no attention), the floor a model that never looks at its
  neighbours reaches;
- `oracle`: no training, the exact denoiser.

    python -m benches.demo_testbed --model microdit --steps 600
    python -m benches.demo_testbed --model oracle

Prints one JSON line (rel mse per sigma: the denoiser's error over that of predicting the mean
image; the samples' within-image std) and writes the 16-sample grid to `--out`.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from microdit.data.shapes import COLORS
from microdit.diffusion import edm

SCALE = 2.5  # latents' std ~0.7: grey background, one square
SIGMAS = (1.0, 2.0, 5.0, 10.0, 20.0)
PALETTE = torch.tensor(list(COLORS.values()), dtype=torch.float32) / 127.5 - 1.0  # (8, 3)
SIDE, RES, FACTOR = 12, 32, 2


def templates() -> torch.Tensor:
    """Every image of the task (8 colours x 20 x 20 places), as latents (3200, 12, 16, 16)."""
    out = torch.zeros(len(PALETTE), RES - SIDE, RES - SIDE, 3, RES, RES)
    for y0 in range(RES - SIDE):
        for x0 in range(RES - SIDE):
            out[:, y0, x0, :, y0:y0 + SIDE, x0:x0 + SIDE] = PALETTE[:, :, None, None]
    return F.pixel_unshuffle(out.flatten(0, 2), FACTOR) * SCALE


class Oracle(nn.Module):
    """The exact posterior-mean denoiser of `images` (uniform prior), as the network F that
    edm.denoise wraps."""

    def __init__(self, images: torch.Tensor, sigma_data: float = 0.9):
        super().__init__()
        self.images, self.sigma_data = images.double().flatten(1), sigma_data

    def forward(self, x_in, c_noise, y, **kw):
        sigma = (c_noise.double() * 4).exp().reshape(-1, 1).expand(x_in.shape[0], 1)
        c_skip, c_out, c_in, _ = edm.precondition(sigma, self.sigma_data)
        x = x_in.double().flatten(1) / c_in
        w = torch.softmax(-torch.cdist(x, self.images) ** 2 / (2 * sigma**2), dim=1)
        return ((w @ self.images - c_skip * x) / c_out).view_as(x_in).to(x_in.dtype)


class PlainBlock(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.n1 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.n2 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(approximate="tanh"), nn.Linear(4 * d, d))
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))

    def forward(self, x, c):
        shift1, scale1, gate1, shift2, scale2, gate2 = (t[:, None] for t in self.ada(c).chunk(6, -1))
        B, N, D = x.shape
        q, k, v = (t.view(B, N, self.heads, -1).transpose(1, 2)
                   for t in self.qkv(self.n1(x) * (1 + scale1) + shift1).split(D, -1))
        x = x + gate1 * self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, D))
        return x + gate2 * self.mlp(self.n2(x) * (1 + scale2) + shift2)


class PlainDiT(nn.Module):
    """A plain DiT on MicroDiT_Micro_2's token grid and width (6 blocks: its 2 mixer + 4 backbone)."""

    def __init__(self, channels=12, dim=128, depth=6, heads=4, grid=8, patch=2):
        super().__init__()
        from microdit.models.microdit import sincos_pos_table
        from microdit.nn.layers import TimestepEmbedder

        self.patch, self.channels, self.grid = patch, channels, grid
        self.embed = nn.Conv2d(channels, dim, patch, patch)
        self.t_embed = TimestepEmbedder(dim)
        self.register_buffer("pos", torch.from_numpy(sincos_pos_table(dim, grid, grid, 1.0)).float()[None])
        self.blocks = nn.ModuleList(PlainBlock(dim, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.final_ada = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        self.out = nn.Linear(dim, patch * patch * channels)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        for m in [b.ada[1] for b in self.blocks] + [self.final_ada[1], self.out]:
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)

    def forward(self, x, c_noise, y, **kw):
        B = x.shape[0]
        h = self.embed(x).flatten(2).transpose(1, 2) + self.pos  # (B, T, D)
        c = self.t_embed(c_noise.reshape(-1)).expand(B, -1)
        for block in self.blocks:
            h = block(h, c)
        shift, scale = self.final_ada(c).chunk(2, -1)
        h = self.out(self.norm(h) * (1 + scale[:, None]) + shift[:, None])  # (B, T, p*p*C)
        g, p, C = self.grid, self.patch, self.channels
        return h.view(B, g, g, p, p, C).permute(0, 5, 1, 3, 2, 4).reshape(B, C, g * p, g * p)


class TokenMLP(nn.Module):
    """Each token denoised from itself alone (1x1 convolutions over the token grid)."""

    def __init__(self, channels=12, patch=2, hidden=512):
        super().__init__()
        from microdit.nn.layers import TimestepEmbedder

        d = channels * patch * patch
        self.patch, self.t_embed = patch, TimestepEmbedder(hidden)
        self.l1, self.l2, self.l3 = nn.Conv2d(d, hidden, 1), nn.Conv2d(hidden, hidden, 1), nn.Conv2d(hidden, hidden, 1)
        self.out = nn.Conv2d(hidden, d, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x, c_noise, y, **kw):
        c = self.t_embed(c_noise.reshape(-1))[:, :, None, None]
        h = F.gelu(self.l1(F.pixel_unshuffle(x, self.patch)) + c)
        h = F.gelu(self.l3(F.gelu(self.l2(h) + c)))
        return F.pixel_shuffle(self.out(h), self.patch)


def build(kind: str, images: torch.Tensor, overrides: dict | None = None) -> nn.Module:
    if kind == "oracle":
        return Oracle(images)
    if kind == "microdit":
        import microdit

        return microdit.create_model("MicroDiT_Micro_2", in_channels=images.shape[1], input_size=images.shape[2],
                                     **(overrides or {}))
    if kind == "plain":
        return PlainDiT(images.shape[1])
    if kind == "token-mlp":
        return TokenMLP(images.shape[1])
    raise ValueError(f"unknown model {kind!r}: microdit, plain, token-mlp or oracle")


def train_edm(model, draw, steps: int, *, lr: float, mask_ratio: float, config, generator, patch: int = 2,
              seconds: float | None = None, ops=None) -> int:
    """AdamW (no weight decay), the library's EDM loss, gradients clipped at 1: `steps` steps on
    batches `draw(generator) -> (x0, y)`; returns the steps done (fewer when `seconds` ran out)."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    t0 = time.perf_counter()
    for done in range(steps):
        if seconds is not None and time.perf_counter() - t0 > seconds:
            return done  # the time budget ran out first
        x0, y = draw(generator)
        step = edm.draw_step(x0.shape[0], x0.shape[1:], patch_size=patch, mask_ratio=mask_ratio,
                             generator=generator, ops=ops)
        loss = edm.loss(model, x0, y, step=step, config=config)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    return steps


def run(kind: str, steps: int, batch: int, lr: float, mask_ratio: float, P_mean: float, P_std: float,
        seed: int, out: str | None, overrides: dict | None = None, seconds: float | None = None) -> dict:
    torch.manual_seed(seed)
    images = templates()
    model = build(kind, images, overrides)
    config = edm.EDMConfig(P_mean=P_mean, P_std=P_std)
    caption = torch.zeros(batch, 1, 384)  # unconditional: MicroDiT's caption path gets zeros
    g = torch.Generator().manual_seed(seed)
    patch = getattr(getattr(model, "config", None), "patch_size", 2)
    t0 = time.perf_counter()
    if kind != "oracle":
        steps = train_edm(model, lambda gen: (images[torch.randint(0, len(images), (batch,), generator=gen)], caption),
                          steps, lr=lr, mask_ratio=mask_ratio, config=config, generator=g, patch=patch,
                          seconds=seconds)
    train_s = time.perf_counter() - t0
    model.eval()
    ge = torch.Generator().manual_seed(1000)
    x0 = images[torch.randint(0, len(images), (64,), generator=ge)]
    base = ((x0 - images.mean(0, keepdim=True)) ** 2).mean().item()
    result = {"model": kind, "steps": 0 if kind == "oracle" else steps, "batch": batch, "lr": lr,
              "mask_ratio": mask_ratio, "P_mean": P_mean, "P_std": P_std, "train_s": round(train_s, 1),
              "overrides": overrides or {}, "parameters": sum(p.numel() for p in model.parameters())}
    with torch.no_grad():
        y = torch.zeros(64, 1, 384)
        for sigma in SIGMAS:
            noisy = x0 + torch.randn(x0.shape, generator=ge) * sigma
            err = ((edm.denoise(model, noisy, sigma, y) - x0) ** 2).mean().item()
            result[f"rel_mse_sigma{sigma:g}"] = round(err / base, 3)
        z = edm.sample(model, torch.randn(16, *images.shape[1:], generator=ge), torch.zeros(16, 1, 384),
                       steps=20, guidance=1.0, config=config)
    pixels = F.pixel_shuffle(z / SCALE, FACTOR).clamp(-1, 1)  # (16, 3, 32, 32)
    # One square on grey: the ideal sample's pixels are one colour inside one 12 x 12 box. The
    # fraction of non-background pixels outside the best-fitting box measures scattered pieces.
    result["scattered_fraction"] = round(scattered_fraction(pixels), 3)
    if out:
        from PIL import Image

        a = ((pixels + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
        grid = np.concatenate([np.concatenate(list(a[r * 4:(r + 1) * 4]), axis=1) for r in range(4)])
        Image.fromarray(grid).resize((512, 512), Image.NEAREST).save(out)
        result["grid"] = out
    return result


def scattered_fraction(pixels: torch.Tensor) -> float:
    """Mean over samples of: foreground pixels (far from the grey background) outside the 12 x 12
    window that holds the most of them, over all foreground pixels (0 for one clean square)."""
    fg = ((pixels - 0.0).abs().amax(dim=1) > 0.25).float()  # (N, 32, 32): background is 0 (grey)
    inside = F.avg_pool2d(fg[:, None], SIDE, stride=1)[:, 0] * SIDE * SIDE  # (N, 21, 21) counts per window
    total = fg.flatten(1).sum(1).clamp(min=1)
    return float((1 - inside.flatten(1).amax(1) / total).mean())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="microdit", choices=["microdit", "plain", "token-mlp", "oracle"])
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--mask-ratio", type=float, default=0.0)
    p.add_argument("--P-mean", type=float, default=1.0)
    p.add_argument("--P-std", type=float, default=1.6)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--seconds", type=float, help="stop training after this many seconds (equal-compute runs)")
    p.add_argument("--out", help="write the 16-sample grid here (png)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="MicroDiTConfig fields for --model microdit, e.g. dim=192 patch_mixer_dim=128")
    a = p.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    overrides = {}
    for o in a.overrides:
        key, _, value = o.partition("=")
        overrides[key] = json.loads(value) if value[:1] in "0123456789-[{tf" else value
    print(json.dumps(run(a.model, a.steps, a.batch, a.lr, a.mask_ratio, a.P_mean, a.P_std, a.seed, a.out,
                         overrides, a.seconds)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
