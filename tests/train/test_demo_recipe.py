"""The demo recipe's data matches its diffusion settings (the finding of docs/demo_experiments.md)."""
import logging

import numpy as np
import torch

from microdit.data.codecs import get_codec
from microdit.data.shapes import ShapesDataset
from microdit.train.config import load_config
from microdit.train.trainer import check_data_scale


def _demo_latents(cfg, n=256):
    ds = ShapesDataset(n, resolution=cfg.data.resolution, seed=0)
    return get_codec(cfg.data.codec).encode(np.stack([ds[i]["image"] for i in range(n)]))


def test_demo_latents_have_the_std_sigma_data_assumes():
    # Shapes pixels in [-1, 1] have std ~0.26: with sigma_data 0.9 the samples were token-sized
    # coloured squares (ShapesEval 0.09). The demo codec scales them to sigma_data.
    cfg = load_config("demo", [])
    std = float(_demo_latents(cfg).std())
    assert 0.8 * cfg.diffusion.sigma_data <= std <= 1.25 * cfg.diffusion.sigma_data, std


def test_data_scale_warning_names_the_fix(caplog):
    cfg = load_config("demo", [])
    raw = get_codec("pixels:2").encode(np.stack([ShapesDataset(64, 32)[i]["image"] for i in range(64)]))
    with caplog.at_level(logging.WARNING, logger="microdit.train"):
        std = check_data_scale(raw, 0.9)
    assert 0.2 < std < 0.32
    assert "pixels:F:3." in caplog.text and "sigma_data is 0.9" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="microdit.train"):
        check_data_scale(_demo_latents(cfg, 64), cfg.diffusion.sigma_data)
        check_data_scale(torch.randn(8, 4, 8, 8) * 0.9, 0.9)
    assert caplog.text == ""
