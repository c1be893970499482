"""The trainer: exact resume after SIGKILL, bad checkpoints, torchrun DDP/FSDP, NaN guard, schedule, EMA."""
import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from microdit.train.checkpoint import CheckpointManager, TrainCheckpointError, load_checkpoint
from microdit.train.config import OptimSection, load_config
from microdit.train.ema import EMA
from microdit.train.optim import build_optimizer, expert_parameter_names, lr_at
from microdit.train.trainer import NonFiniteLossError, Trainer
from tests.train.fakes import DATA_INFO, MemoryLoader

SCRIPT = str(Path(__file__).with_name("run_fake.py"))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}


def run(out, steps=8, micro=4, glob=8, *flags, nproc=1):
    args = [str(out), str(steps), str(micro), str(glob), *flags]
    if nproc == 1:
        cmd = [sys.executable, SCRIPT, *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", SCRIPT, *args]
    return subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600)


def final_state(out):
    ckpt = load_checkpoint(CheckpointManager(Path(out) / "checkpoints").list()[-1])
    return ckpt


def assert_same_state(a, b):
    assert a["step"] == b["step"]
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert sa.keys() == sb.keys()
    for k in sa:
        for name in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(sa[k][name], sb[k][name]), (k, name)


def test_sigkill_and_resume_is_bit_identical(tmp_path):
    ref = run(tmp_path / "ref", 10)
    assert ref.returncode == 0, ref.stderr[-2000:]
    kill_at = random.Random(os.getpid()).randint(3, 8)  # a random step, reported on failure
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, SCRIPT, str(out), "10", "4", "8"], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= kill_at:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, f"training ended before the kill at step {kill_at}"
    resumed = run(out, 10, 4, 8, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stderr, resumed.stderr[-2000:]
    first = json.loads((out / "record.json").read_text())[0]["step"]
    assert 1 < first <= kill_at + 1, (first, kill_at)  # continued, not restarted
    assert_same_state(final_state(tmp_path / "ref"), final_state(out))


def test_truncated_checkpoint_falls_back_to_previous(tmp_path, caplog):
    cfg = load_config(None, ["model.preset=MicroDiT_Test_2", "train.steps=4", "train.micro_batch=4",
                             "train.global_batch=4", "train.ckpt_every=2", "train.tensorboard=false",
                             f"out={tmp_path}", "train.log_every=100"])
    Trainer(cfg, MemoryLoader(batch_size=4), DATA_INFO).run()
    mgr = CheckpointManager(tmp_path / "checkpoints")
    newest = mgr.list()[-1]
    data = newest.read_bytes()
    newest.write_bytes(data[: len(data) // 3])
    with pytest.raises(TrainCheckpointError, match=newest.name):
        load_checkpoint(newest)
    state, path = mgr.load_latest()
    assert path.name == "step_00000002.pt" and state["step"] == 2
    assert "skipping unusable checkpoint" in caplog.text and newest.name in caplog.text
    # Resuming continues from step 2 and rewrites step 4.
    t = Trainer(cfg, MemoryLoader(batch_size=4), DATA_INFO, resume=True)
    assert t.step == 2
    t.run()
    assert load_checkpoint(newest)["step"] == 4


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_torchrun_two_ranks_match_single_process(tmp_path, parallel):
    two = run(tmp_path / "two", 4, 4, 8, "--check-ranks", f"train.parallel={parallel}", nproc=2)
    assert two.returncode == 0, two.stderr[-3000:]
    one = run(tmp_path / "one", 4, 8, 8)
    assert one.returncode == 0, one.stderr[-3000:]
    rec2 = json.loads((tmp_path / "two" / "record.json").read_text())
    rec1 = json.loads((tmp_path / "one" / "record.json").read_text())
    assert len(rec2) == len(rec1) == 4
    for a, b in zip(rec2, rec1):
        assert len(set(a["digests"])) == 1, f"ranks differ after step {a['step']}"
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    sa, sb = final_state(tmp_path / "two"), final_state(tmp_path / "one")
    for k in sa["model"]:
        torch.testing.assert_close(sa["model"][k], sb["model"][k], rtol=1e-4, atol=1e-6)


class NaNLoader(MemoryLoader):
    def __init__(self, bad_from, **kw):
        super().__init__(**kw)
        self.bad_from = bad_from

    def __iter__(self):
        for batch in super().__iter__():
            if self.position > self.bad_from:
                batch = {**batch, "latents": batch["latents"] * float("nan")}
            yield batch


def test_nan_guard_skips_then_stops(tmp_path):
    cfg = load_config(None, ["model.preset=MicroDiT_Test_2", "train.steps=20", "train.micro_batch=4",
                             "train.global_batch=4", "train.max_bad_steps=3", "train.tensorboard=false",
                             f"out={tmp_path}", "train.ckpt_every=0", "train.log_every=1"])
    t = Trainer(cfg, NaNLoader(bad_from=2, batch_size=4), DATA_INFO)
    before = {k: v.clone() for k, v in t.raw.state_dict().items()}
    with pytest.raises(NonFiniteLossError, match="3 non-finite steps in a row"):
        t.run()
    assert t.skipped_steps == 3 and t.step == 4  # two good steps, then two skipped; the third bad one stops
    assert all(torch.isfinite(v).all() for v in t.raw.state_dict().values())
    assert any(not torch.equal(before[k], v) for k, v in t.raw.state_dict().items())


def test_lr_schedule():
    cfg = OptimSection(lr=1.0, warmup_steps=10, schedule="cosine", min_lr_ratio=0.33)
    assert lr_at(0, 100, cfg) == pytest.approx(0.1) and lr_at(9, 100, cfg) == pytest.approx(1.0)
    assert lr_at(10, 100, cfg) == pytest.approx(1.0) and lr_at(100, 100, cfg) == pytest.approx(0.33)
    assert lr_at(55, 100, cfg) == pytest.approx(0.33 + 0.67 * 0.5)
    const = OptimSection(lr=8e-5, warmup_steps=0, schedule="constant")
    assert lr_at(0, 10, const) == lr_at(9, 10, const) == 8e-5


def test_expert_parameter_group():
    import microdit

    m = microdit.create_model("MicroDiT_Test_2")
    names = expert_parameter_names(m)
    assert names and all(n.endswith((".mlp.w1", ".mlp.w2")) for n in names)
    opt = build_optimizer(m, OptimSection(lr=1e-3, moe_lr_factor=0.5))
    groups = {g["name"]: g for g in opt.param_groups}
    assert groups["experts"]["lr"] == pytest.approx(5e-4) and groups["dense"]["lr"] == pytest.approx(1e-3)
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == m.num_parameters()


def test_ema():
    lin = torch.nn.Linear(2, 2)
    ema = EMA(lin, decay=0.9, start_step=2)
    with torch.no_grad():
        lin.weight.fill_(1.0)
    ema.update(lin, 1)  # before start_step: a copy
    assert torch.equal(ema.shadow["weight"], lin.weight)
    with torch.no_grad():
        lin.weight.fill_(2.0)
    ema.update(lin, 2)
    torch.testing.assert_close(ema.shadow["weight"], torch.full((2, 2), 1.1))


def test_config_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown key 'lrr'"):
        load_config(None, ["optim.lrr=1"])
    with pytest.raises(ValueError, match="not a multiple"):
        load_config(None, ["train.global_batch=10", "train.micro_batch=4"])
    with pytest.raises(FileNotFoundError, match="no config 'nope'"):
        load_config("nope")
    bad = tmp_path / "x.yaml"
    bad.write_text("train:\n  stepz: 3\n")
    with pytest.raises(ValueError, match="unknown key 'stepz'"):
        load_config(str(bad))


def test_dict_overrides_merge():
    cfg = load_config(None, ["model.overrides.dim=96", "model.overrides.depth=3", "model.backends.moe=reference"])
    assert cfg.model.overrides == {"dim": 96, "depth": 3} and cfg.model.backends == {"moe": "reference"}


def test_sample_grid_skipped_when_the_data_encoders_cannot_be_rebuilt(tmp_path, monkeypatch, caplog):
    """A recorded text encoder that no longer loads (here: a folder without config.json, a ValueError)
    skips the grid with a warning instead of ending the run."""
    import logging

    from microdit.train import sampling
    from microdit.train.config import load_config
    from microdit.train.trainer import Trainer
    from tests.train.fakes import DATA_INFO, MemoryLoader

    bad = tmp_path / "not-a-model"
    bad.mkdir()
    info = {**DATA_INFO, "text_encoder": {"kind": "hf", "path": str(bad)}, "codec": {"kind": "pixels"}}

    def broken(data_info, device):
        raise ValueError(f"{bad} is not a text encoder folder: it has no config.json")

    monkeypatch.setattr(sampling, "encoders_from", broken)
    cfg = load_config(None, ["model.preset=MicroDiT_Test_2", f"out={tmp_path / 'run'}", "train.micro_batch=4",
                             "train.global_batch=4", "train.steps=1"])
    trainer = Trainer(cfg, MemoryLoader(batch_size=4), info)
    with caplog.at_level(logging.WARNING, logger="microdit.train"):
        assert trainer.sample_grid() is None
    assert "sample grid skipped" in caplog.text and "config.json" in caplog.text


FLUSH_CHECK = """
import sys, tempfile, torch
from microdit.train.config import load_config
from microdit.train.trainer import Trainer
from tests.train.fakes import DATA_INFO, MemoryLoader
tiny = torch.tensor([1e-40])  # a denormal float32
before = bool((tiny * 1.0)[0] == 0)
with tempfile.TemporaryDirectory() as out:
    cfg = load_config(None, ["model.preset=MicroDiT_Test_2", "train.device=cpu", f"out={out}",
                             "train.flush_denormal=" + sys.argv[1]])
    Trainer(cfg, MemoryLoader(), DATA_INFO).lock.release()
print(before, bool((tiny * 1.0)[0] == 0))
"""


@pytest.mark.parametrize("flush", ["true", "false"])
def test_flush_denormal_sets_the_cpu_mode(flush):
    """train.flush_denormal=true: denormals become zero in the training process (a subprocess:
    the mode outlives the trainer)."""
    run = subprocess.run([sys.executable, "-c", FLUSH_CHECK, flush], env=ENV, capture_output=True, text=True,
                         timeout=300, cwd=Path(__file__).parents[2])
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.split()[-2:] == ["False", "True" if flush == "true" else "False"]
