"""The paper's four phase configs, shrunk to a tiny model, run end to end and chain by checkpoint."""
import pytest
import torch

from microdit.train.checkpoint import CheckpointManager, load_checkpoint
from microdit.train.config import load_config
from microdit.train.trainer import Trainer
from tests.train.fakes import MemoryLoader

TINY = ["model.preset=MicroDiT_Test_2", "train.steps=2", "train.global_batch=4", "train.micro_batch=4",
        "train.log_every=1", "train.ckpt_every=0", "train.tensorboard=false", "data.num_workers=0",
        "train.precision=fp32"]


def test_phase_settings_are_the_papers():
    p = [load_config(f"phase{i}") for i in (1, 2, 3, 4)]
    assert [c.diffusion.mask_ratio for c in p] == [0.75, 0.0, 0.75, 0.0]
    assert [c.data.resolution for c in p] == [256, 256, 512, 512]
    assert [c.train.steps for c in p] == [250_000, 30_000, 50_000, 5_000]
    assert [c.optim.lr for c in p] == [2.4e-4, 8e-5, 8e-5, 8e-5]
    assert [c.optim.warmup_steps for c in p] == [2500, 0, 500, 0]
    assert [c.optim.grad_clip for c in p] == [0.25, 0.25, 0.5, 0.5]
    assert [(c.diffusion.P_mean, c.diffusion.P_std) for c in p] == [(-0.6, 1.2), (-0.6, 1.2), (0.0, 0.6), (0.0, 0.6)]
    assert all(c.train.global_batch == 2048 and c.model.preset == "MicroDiT_XL_2" for c in p)
    assert p[0].optim.schedule == "cosine" and p[0].optim.min_lr_ratio == 0.33
    assert [c.model.overrides.get("pos_interp_scale", 1.0) for c in p] == [1.0, 1.0, 2.0, 2.0]
    assert [c.train.init_from for c in p] == [None, "runs/phase1", "runs/phase2", "runs/phase3"]


def test_four_phases_chain(tmp_path):
    prev = None
    models = []
    for i, latent in ((1, 8), (2, 8), (3, 16), (4, 16)):
        out = tmp_path / f"phase{i}"
        over = TINY + [f"out={out}"] + ([f"train.init_from={prev}"] if prev else [])
        cfg = load_config(f"phase{i}", over)
        info = {"channels": 4, "latent_size": latent, "caption_dim": 32, "caption_len": 5}
        trainer = Trainer(cfg, MemoryLoader(batch_size=4, size=latent), info)
        if prev:  # the previous phase's weights were loaded (before this phase trains)
            before = load_checkpoint(CheckpointManager(prev / "checkpoints").list()[-1])["model"]
            for k, v in trainer.raw.state_dict().items():
                if k != "pos_embed":
                    assert torch.equal(v, before[k]), (i, k)
        summary = trainer.run()
        assert summary["steps"] == 2 and all(torch.isfinite(torch.tensor(l)) for _, l in summary["loss_curve"])
        models.append(trainer.raw)
        prev = out
    assert models[1].pos_embed.shape == (1, 16, 64) and models[2].pos_embed.shape == (1, 64, 64)
    assert models[2].config.pos_interp_scale == 2.0
    # Phase 3's table is the regenerated one, not phase 2's.
    expect = type(models[2])(models[2].config).pos_embed
    assert torch.equal(models[2].pos_embed, expect)


def test_init_from_mismatch_is_named(tmp_path):
    cfg = load_config("phase1", TINY + [f"out={tmp_path / 'a'}"])
    Trainer(cfg, MemoryLoader(batch_size=4), {"channels": 4, "latent_size": 8, "caption_dim": 32}).run()
    cfg2 = load_config("phase2", TINY + [f"out={tmp_path / 'b'}", f"train.init_from={tmp_path / 'a'}"])
    from microdit.train.checkpoint import TrainCheckpointError

    with pytest.raises(TrainCheckpointError, match="y_embedder.y_proj.fc1.weight"):
        Trainer(cfg2, MemoryLoader(batch_size=4, caption=(5, 16)), {"channels": 4, "latent_size": 8, "caption_dim": 16})
