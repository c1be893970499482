"""diffusion.high_noise_*: the first steps draw their noise from a high-noise distribution."""
import types

import pytest
import torch

from microdit.diffusion import edm
from microdit.train.config import ConfigError, load_config
from microdit.train.trainer import Trainer


def test_edm_config_by_step():
    cfg = load_config("demo", ["diffusion.high_noise_steps=10", "diffusion.high_noise_P_mean=3.5",
                               "diffusion.high_noise_P_std=0.5", "diffusion.P_mean=-0.6", "diffusion.P_std=1.2"])
    d = cfg.diffusion
    for step in (0, 9):
        assert (d.edm_config(step).P_mean, d.edm_config(step).P_std) == (3.5, 0.5)
    for step in (10, 500, None):
        assert (d.edm_config(step).P_mean, d.edm_config(step).P_std) == (-0.6, 1.2)
    assert d.edm_config(0).sigma_data == d.edm_config().sigma_data == d.sigma_data
    off = load_config("demo", ["diffusion.high_noise_steps=0"]).diffusion
    assert off.edm_config(0) == off.edm_config()


def test_trainer_uses_the_step_constants_and_the_sigmas_follow():
    cfg = load_config("demo", ["diffusion.high_noise_steps=3", "diffusion.high_noise_P_mean=3.0",
                               "diffusion.high_noise_P_std=0.0"])
    fake = types.SimpleNamespace(cfg=cfg, edm_config=cfg.diffusion.edm_config(),
                                 high_noise_edm_config=cfg.diffusion.edm_config(0), step=0)
    seen = []
    for step in range(5):
        fake.step = step
        config = Trainer.step_edm_config(fake)
        seen.append((config.P_mean, config.P_std))
        # What edm.loss makes of it: sigma = exp(rnd_normal * P_std + P_mean).
        x0 = torch.zeros(2, 4, 4, 4)
        s = edm.draw_step(2, x0.shape[1:], patch_size=2, generator=torch.Generator().manual_seed(step))
        sigma = (s.rnd_normal * config.P_std + config.P_mean).exp()
        if step < 3:
            torch.testing.assert_close(sigma, torch.full_like(sigma, float(torch.tensor(3.0).exp())))
    d = cfg.diffusion
    assert seen == [(3.0, 0.0)] * 3 + [(d.P_mean, d.P_std)] * 2


def test_bad_curriculum_settings_are_refused():
    with pytest.raises(ConfigError, match="high_noise_steps"):
        load_config("demo", ["diffusion.high_noise_steps=-1"])
    with pytest.raises(ConfigError, match="high_noise_P_std"):
        load_config("demo", ["diffusion.high_noise_P_std=-0.5"])
