"""How much of the noise a trained denoiser removes, in object tokens and in background tokens.

For a training checkpoint (or a run directory: its latest), on `--num` samples of the run's own
data: noise of level sigma is added, the EMA denoiser is applied once, and its error is split
along the noise. Per noise level and token kind it reports

- `noise_left`: the least-squares k in error = k * noise + rest (0: the noise is removed, as an
  ideal denoiser does at low sigma; 1: it is passed through untouched),
- `rms_err`: the error's RMS in 0-255 pixel units (for `pixels` codecs),
- `ln_input_std`: the mean per-token std of the final layer's LayerNorm input.

Object tokens are those whose every latent value differs from the image's background (the
per-channel median) by more than `--object-threshold`; background tokens those within 0.05. On
the demo's shapes, a denoiser that removes the noise on the grey background but leaves most of
it in the objects draws speckled objects (docs/demo_experiments.md, sixth round).

    python -m benches.demo_noise_probe runs/demo
    python -m benches.demo_noise_probe runs/demo --offset 1   # every clean value + 1 (a lighter background)
    python -m benches.demo_noise_probe runs/demo --sigmas 80 20 5 --grid g.png   # what the caption alone draws
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

SIGMAS = (0.3, 1.0, 2.0)


def token_kinds(x0: torch.Tensor, patch_size: int, object_threshold: float = 1.0):
    """(object, background) bool masks (B, T) of the tokens of latents x0 (B, C, H, W)."""
    bg_value = x0.flatten(2).median(dim=2).values[:, :, None, None]  # (B, C, 1, 1)
    dev = (x0 - bg_value).abs()  # (B, C, H, W)
    far = F.avg_pool2d((dev > object_threshold).float().amin(1, keepdim=True), patch_size).flatten(1)
    near = F.avg_pool2d((dev <= 0.05).float().amin(1, keepdim=True), patch_size).flatten(1)
    return far == 1.0, near == 1.0


def _tokens(t: torch.Tensor, p: int) -> torch.Tensor:
    return F.unfold(t, p, stride=p).transpose(1, 2)  # (B, T, C*p*p)


@torch.no_grad()
def noise_probe(model, x0, y, *, sigma_data: float, patch_size: int, sigmas=SIGMAS, to_255: float = 1.0,
                object_threshold: float = 1.0, seed: int = 0, offset: float = 0.0, denoised: list | None = None) -> dict:
    """The per-noise-level report described in the module docstring; `to_255` converts latent
    units to 0-255 pixel units (127.5 / scaling_factor for a pixels codec). `offset` is added to
    every clean latent value first (the token kinds are those of the unshifted latents): a
    denoiser whose noise removal does not depend on a token's content is unchanged by it.
    `denoised`, a list, receives each sigma's denoised latents."""
    from microdit.diffusion import edm

    obj, bg = token_kinds(x0, patch_size, object_threshold)
    x0 = x0 + offset
    store = {}
    final = getattr(model, "final_layer", None)
    hook = None if final is None else final.register_forward_pre_hook(
        lambda m, args: store.__setitem__("ln_in", args[0].detach()))
    g = torch.Generator().manual_seed(seed)
    out = {}
    try:
        for s in sigmas:
            noise = torch.randn(x0.shape, generator=g) * s
            D = edm.denoise(model, x0 + noise, torch.tensor(float(s)), y, sigma_data=sigma_data)
            if denoised is not None:
                denoised.append(D)
            err, nz = _tokens(D - x0, patch_size), _tokens(noise, patch_size)
            row = {}
            for kind, m in (("object", obj), ("background", bg)):
                if not bool(m.any()):
                    row[kind] = None
                    continue
                e, n = err[m], nz[m]
                entry = {"tokens": int(m.sum()),
                         "noise_left": round(float((e * n).sum() / (n * n).sum()), 3),
                         "rms_err": round(float(e.pow(2).mean().sqrt()) * to_255, 2)}
                if "ln_in" in store and store["ln_in"].shape[1] == m.shape[1]:
                    entry["ln_input_std"] = round(float(store["ln_in"].std(-1)[m].mean()), 3)
                row[kind] = entry
            out[str(s)] = row
    finally:
        if hook is not None:
            hook.remove()
    return {"object_tokens": int(obj.sum()), "background_tokens": int(bg.sum()), "sigmas": out}


def _grid(path: str, rows, codec: dict) -> None:
    """Saves latents rows (each (B, C, H, W)) decoded by the run's pixels codec as one PNG."""
    import numpy as np
    from PIL import Image

    from microdit.data.codecs import codec_from_metadata

    codec = codec_from_metadata(codec)
    images = [np.concatenate(list(codec.decode(r).numpy()), 1) for r in rows]  # (H, 8 W, 3) each
    grid = np.concatenate(images, 0)
    Image.fromarray(grid).resize((grid.shape[1] * 4, grid.shape[0] * 4), Image.NEAREST).save(path)


def probe_checkpoint(checkpoint: str, num: int = 128, sigmas=SIGMAS, weights: str = "ema", offset: float = 0.0,
                     grid: str | None = None) -> dict:
    from benches.demo_experiments import load_run_checkpoint

    path = Path(checkpoint)
    if path.is_dir():
        ckpts = sorted((path / "checkpoints").glob("step_*.pt")) if (path / "checkpoints").is_dir() else []
        if not ckpts:
            raise FileNotFoundError(f"{checkpoint}: no checkpoints/step_*.pt in this run directory")
        path = ckpts[-1]
    model, state, batch, use_ema = load_run_checkpoint(str(path), num, weights)
    sigma_data = state.get("config", {}).get("diffusion", {}).get("sigma_data", 0.9)
    scale = state["data_info"].get("codec", {}).get("scaling_factor", 1.0)
    denoised = [] if grid else None
    report = noise_probe(model, batch["latents"], batch["caption_states"], sigma_data=sigma_data,
                         patch_size=model.config.patch_size, sigmas=sigmas, to_255=127.5 / scale, offset=offset,
                         denoised=denoised)
    if grid:
        _grid(grid, [batch["latents"][:8] + offset] + [d[:8] for d in denoised], state["data_info"]["codec"])
    return {"checkpoint": str(path), "weights": "ema" if use_ema else "raw", **report}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", help="a training checkpoint or a run directory (its latest)")
    p.add_argument("--num", type=int, default=128)
    p.add_argument("--weights", choices=("ema", "raw"), default="ema")
    p.add_argument("--sigmas", type=float, nargs="+", default=list(SIGMAS))
    p.add_argument("--offset", type=float, default=0.0,
                   help="add this to every clean latent value first (e.g. a uniform background shift)")
    p.add_argument("--grid", help="save a PNG: 8 clean images, then the denoised ones at each sigma, a row each")
    args = p.parse_args(argv)
    print(json.dumps(probe_checkpoint(args.checkpoint, args.num, tuple(args.sigmas), args.weights, args.offset,
                                      args.grid)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
