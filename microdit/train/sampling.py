"""Sample grids of a training run with the encoders recorded with its data (see microdit.pipeline)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch



def encoders_from(data_info: dict, device):
    """The text encoder and image codec that made the training data (from its metadata)."""
    from ..data.encoders import codec_from_metadata, text_encoder_from_metadata

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
    pipe = MicroDiTPipeline(model, text_encoder, codec, device=device, dtype=torch.float32)
    return pipe.images(prompts, steps=steps, guidance=guidance, seed=seed, num_per_prompt=num_per_prompt,
                       batch_size=batch_size, jobs=jobs)


def save_grid(images: np.ndarray, path, nrow: int) -> Path:
    """Tile uint8 (N, H, W, 3) images into a PNG with `nrow` images per row."""
    from PIL import Image

    n, h, w, _ = images.shape
    rows = (n + nrow - 1) // nrow
    grid = np.full((rows * (h + 2) + 2, nrow * (w + 2) + 2, 3), 255, dtype=np.uint8)
    for idx, img in enumerate(images):
        r, c = divmod(idx, nrow)
        grid[2 + r * (h + 2):2 + r * (h + 2) + h, 2 + c * (w + 2):2 + c * (w + 2) + w] = img
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).save(path)
    return path
