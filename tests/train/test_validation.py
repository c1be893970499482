"""Validation during training: fixed-noise EDM loss, identical for the same weights eager or compiled
and on 1 or 2 ranks (FSDP), logged to metrics.jsonl; the held-out split of the shards."""
import json

import pytest
import torch

from microdit.train.checkpoint import CheckpointManager
from microdit.train.config import load_config
from microdit.train.validation import HeldOut, Validator, build_validator, held_out_count
from tests.train.fakes import DATA_INFO, MemoryLoader
from tests.train.test_trainer import ENV, SCRIPT, run

VAL = ["--val", "val.every=1", "val.samples=12", "val.batch_size=4", "val.sigmas=[0.1,1.0,10.0]"]


def val_log(out) -> dict:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows if "loss/val" in r}


@pytest.mark.slow  # two trainer subprocesses, one under torchrun
def test_validation_identical_on_one_and_two_ranks(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    r = run(one, 2, 8, 8, *VAL)
    assert r.returncode == 0, r.stderr[-3000:]
    # 3 fixed batches over 2 ranks (one rank repeats a batch, as FSDP's collective forwards need).
    r = run(two, 2, 4, 8, *VAL, "train.parallel=fsdp", nproc=2)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = val_log(one), val_log(two)
    assert sorted(a) == sorted(b) == [0, 1, 2]
    assert set(a[0]) == {"step", "loss/val", "loss/val_sigma_0.1", "loss/val_sigma_1", "loss/val_sigma_10"}
    assert a[0] == b[0]  # the same weights (step 0): bit for bit
    for step in (1, 2):  # trained on 1 vs 2 ranks: the weights agree to rounding, so do the losses
        assert b[step]["loss/val"] == pytest.approx(a[step]["loss/val"], rel=1e-5)
    assert a[2]["loss/val"] != a[0]["loss/val"]


@pytest.mark.slow  # torch.compile of a training step on the CPU
def test_validation_identical_eager_and_compiled(tmp_path):
    import subprocess
    import sys

    comp, eager = tmp_path / "compiled", tmp_path / "eager"
    # Inductor's C++ compile of a training step takes minutes on a busy 2-core machine.
    r = subprocess.run([sys.executable, SCRIPT, str(comp), "1", "8", "8", *VAL, "train.compile=true"], env=ENV,
                       capture_output=True, text=True, timeout=2400)
    assert r.returncode == 0, r.stderr[-3000:]
    ckpt = CheckpointManager(comp / "checkpoints").list()[-1]
    # The eager run starts from the compiled run's trained weights and validates them at its step 0
    # (before its own training step).
    r = run(eager, 1, 8, 8, *VAL, f"train.init_from={ckpt}")
    assert r.returncode == 0, r.stderr[-3000:]
    c, e = val_log(comp), val_log(eager)
    assert c[1] | {"step": 0} == e[0]
    assert c[1]["loss/val"] != c[0]["loss/val"]  # the compiled step did change the weights


def test_validator_is_deterministic_and_uses_fixed_noise(tmp_path):
    cfg = load_config(None, ["model.preset=MicroDiT_Test_2", "val.every=1", "val.samples=6", "val.batch_size=4",
                             "train.tensorboard=false", f"out={tmp_path}"])
    from microdit.train.trainer import Trainer

    loader = MemoryLoader(batch_size=4)
    v = Validator(cfg.val, HeldOut(loader, range(58, 64)), cfg.diffusion)
    trainer = Trainer(cfg, loader, DATA_INFO)
    first, again = v(trainer), Validator(cfg.val, HeldOut(loader, range(58, 64)), cfg.diffusion)(trainer)
    assert first == again and len(first) == len(cfg.val.sigmas) + 1
    cfg.val.seed = 1
    assert Validator(cfg.val, HeldOut(loader, range(58, 64)), cfg.diffusion)(trainer) != first
    assert trainer.raw.training  # left in training mode


def test_held_out_split_and_errors():
    assert held_out_count(100, 0.05) == 5 and held_out_count(10, 0.01) == 1 and held_out_count(10, 0) == 0
    with pytest.raises(ValueError, match="val_fraction"):
        held_out_count(10, 1.5)
    cfg = load_config(None, ["val.every=5"])
    with pytest.raises(ValueError, match="--val-data"):
        build_validator(cfg, train_dataset=list(range(10)))
    cfg = load_config(None, ["val.every=5", "data.val_fraction=0.2"])
    v = build_validator(cfg, train_dataset=list(range(10)))
    assert v.data.indices == [8, 9]
    with pytest.raises(ValueError, match="sigmas"):
        Validator(load_config(None, ["val.sigmas=[0.0]"]).val, HeldOut([0], [0]), cfg.diffusion)
