"""Sampling from training runs: load a run's model, generate over all ranks, save images and grids.

`load_for_sampling` (model and data_info of a run or checkpoint; MicroDiTPipeline.from_run builds
on it), `generate_distributed` (a pipeline's images split over torchrun ranks), `save_images`,
`save_grid`, and `generate` (the trainer's sample grids, with the encoders recorded with its data).
"""
from __future__ import annotations

from pathlib import Path

import logging

import numpy as np
import torch

log = logging.getLogger("microdit.train")


def load_for_sampling(checkpoint, use_ema: bool, device):
    """(model, data_info) from a training checkpoint file or output directory (its latest)."""
    from ..models.config import MicroDiTConfig
    from ..models.microdit import MicroDiT
    from .checkpoint import TrainCheckpointError, load_checkpoint, resolve_checkpoint

    path = resolve_checkpoint(checkpoint)
    state = load_checkpoint(path)
    if use_ema and not state.get("ema"):
        raise TrainCheckpointError(f"{path}: --ema asked for, but this run kept no EMA (ema.enabled was false); "
                                   "sample without --ema")
    weights = state["ema"]["shadow"] if use_ema else state["model"]
    model = MicroDiT(MicroDiTConfig.from_dict(state["model_config"]))
    model.load_state_dict(weights)
    log.info("loaded %s (step %d%s)", path, state["step"], ", EMA weights" if use_ema else "")
    # The run's EDM data std travels with its data info: sampling must precondition as training did.
    sigma_data = state.get("config", {}).get("diffusion", {}).get("sigma_data")
    info = dict(state["data_info"], **({} if sigma_data is None else {"sigma_data": sigma_data}))
    return model.to(device).eval(), info


def generate_distributed(pipe, prompts, info, *, num_per_prompt: int = 1, **kw):
    """`pipe.images` over all ranks of `info` (a distributed.DistInfo): each rank makes its share
    of the (prompt, k) jobs; rank 0 gets all images in order, the others None."""
    from . import distributed

    jobs = [(i, j) for i in range(len(prompts)) for j in range(num_per_prompt)]
    mine = jobs[info.rank::info.world_size]
    # Every image is a function of (seed, prompt, k) alone, so the split does not change it.
    made = pipe.images(prompts, jobs=mine, **kw) if mine else []
    images = {job: made[n:n + 1] for n, job in enumerate(mine)}
    if info.enabled:
        gathered = [None] * info.world_size
        torch.distributed.all_gather_object(gathered, images)
        for part in gathered:
            images.update(part)
    distributed.barrier(info)
    return np.concatenate([images[job] for job in jobs]) if info.is_main else None


def save_images(images: np.ndarray, out, num_per_prompt: int) -> Path:
    """<prompt index>_<k>.png for each of the prompt-major `images`, and grid.png (a row per prompt)."""
    from PIL import Image

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for n, img in enumerate(images):
        i, k = divmod(n, num_per_prompt)
        Image.fromarray(img).save(out / f"{i}_{k}.png")
    return save_grid(images, out / "grid.png", nrow=num_per_prompt)


def encoders_from(data_info: dict, device):
    """The text encoder and image codec that made the training data (from its metadata)."""
    from ..data.codecs import codec_from_metadata
    from ..data.text_encoders import text_encoder_from_metadata

    return (text_encoder_from_metadata(data_info["text_encoder"]).to(device),
            codec_from_metadata(data_info["codec"]).to(device))


def generate(model, prompts: list[str], data_info: dict, *, num_per_prompt: int = 1, steps: int = 30,
             guidance: float = 5.0, seed: int = 0, batch_size: int = 16, encoders=None,
             jobs: list[tuple[int, int]] | None = None) -> np.ndarray:
    """uint8 images (len(prompts) * num_per_prompt, H, W, 3), prompt-major; same seed, same images.

    `jobs` picks (prompt index, k) pairs to make instead of all of them, in that order. Float32,
    through the same `MicroDiTPipeline.images` as `microdit generate`.
    """
    from ..pipeline import MicroDiTPipeline

    device = next(model.parameters()).device
    text_encoder, codec = encoders or encoders_from(data_info, device)
    pipe = MicroDiTPipeline(model, text_encoder, codec, device=device, dtype=torch.float32,
                            sigma_data=data_info.get("sigma_data"))
    return pipe.images(prompts, steps=steps, guidance=guidance, seed=seed, num_per_prompt=num_per_prompt,
                       batch_size=batch_size, jobs=jobs)


def save_grid(images: np.ndarray, path, nrow: int, *, gap: int = 2, border: int | None = None,
              fill: int = 255, scale: int = 1) -> Path:
    """Tile uint8 (N, H, W, 3) images into a PNG with `nrow` images per row, `gap` pixels of
    `fill` between them and `border` (default: `gap`) around them, magnified `scale` times."""
    from PIL import Image

    n, h, w, _ = images.shape
    b = gap if border is None else border
    rows = (n + nrow - 1) // nrow
    grid = np.full((rows * (h + gap) - gap + 2 * b, nrow * (w + gap) - gap + 2 * b, 3), fill, dtype=np.uint8)
    for idx, img in enumerate(images):
        r, c = divmod(idx, nrow)
        y, x = b + r * (h + gap), b + c * (w + gap)
        grid[y:y + h, x:x + w] = img
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(grid)
    if scale != 1:
        im = im.resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST)
    im.save(path)
    return path
