"""`microdit train/sample/eval` on real prepared shards (shapes, pixel codec, MiniLM), as users run them."""
import json
import os
import subprocess
import sys

import pytest
import torch

from microdit.train.checkpoint import CheckpointManager, load_checkpoint

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
TINY = ["model.preset=MicroDiT_Test_2", "train.global_batch=8", "train.micro_batch=8", "train.log_every=1",
        "train.tensorboard=false", "train.sample_steps=2", "train.precision=fp32", "data.caption_dropout=0.1"]


def cli(*args, nproc=1, timeout=600):
    if nproc == 1:
        cmd = [sys.executable, "-m", "microdit.cli", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "microdit.cli", *args]
    r = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{' '.join(args[:2])} failed:\n{r.stderr[-4000:]}"
    return r


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from microdit.data.text_encoders import get_text_encoder
    from microdit.data.prepare import prepare

    root = tmp_path_factory.mktemp("shards")
    summary = prepare("shapes", root, resolutions=(16, 32), codec="pixels",
                      text_encoder=get_text_encoder("minilm", max_length=16), num=48, seed=0, progress=False)
    assert summary["written"] == 48
    return root


def metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_train_sample_eval(shards, tmp_path):
    out = tmp_path / "run"
    cli("train", "--config", "demo", "--data", str(shards), "--out", str(out), "--steps", "3",
        "data.resolution=16", "ema.enabled=true", "ema.start_step=0", *TINY)
    assert [m["step"] for m in metrics(out)] == [1, 2, 3]
    assert (out / "samples" / "step_00000003.png").exists() and (out / "summary.json").exists()
    prompts = ["a large red circle in the center", "a small blue square at the top left"]
    for d in ("s1", "s2"):
        cli("sample", str(out), *prompts, "--num-per-prompt", "2", "--steps", "2", "--ema", "--out", str(tmp_path / d))
    for name in ("0_0.png", "0_1.png", "1_0.png", "1_1.png", "grid.png"):
        assert (tmp_path / "s1" / name).read_bytes() == (tmp_path / "s2" / name).read_bytes(), name
    cli("eval", str(out), "--out", str(tmp_path / "eval.json"), "--num", "6", "--steps", "2")
    report = json.loads((tmp_path / "eval.json").read_text())
    assert {"colors", "position", "overall", "num_prompts"} <= report.keys() and report["num_prompts"] == 6


def test_resume_through_cli(shards, tmp_path):
    out = tmp_path / "run"
    cli("train", "--config", "demo", "--data", str(shards), "--out", str(out), "--steps", "2", "data.resolution=16",
        "train.ckpt_every=1", *TINY)
    cli("train", "--config", "demo", "--data", str(shards), "--out", str(out), "--steps", "4", "--resume",
        "data.resolution=16", "train.ckpt_every=1", *TINY)
    assert [m["step"] for m in metrics(out)] == [1, 2, 3, 4]


def test_torchrun_real_loader_matches_single_process(shards, tmp_path):
    common = ["train", "--config", "demo", "--data", str(shards), "--steps", "3", "data.resolution=16", *TINY]
    cli(*common, "--out", str(tmp_path / "two"), "train.micro_batch=4", nproc=2)
    cli(*common, "--out", str(tmp_path / "one"))
    for a, b in zip(metrics(tmp_path / "two"), metrics(tmp_path / "one"), strict=True):
        assert a["loss/train"] == pytest.approx(b["loss/train"], rel=1e-5)
    sa = load_checkpoint(CheckpointManager(tmp_path / "two" / "checkpoints").list()[-1])
    sb = load_checkpoint(CheckpointManager(tmp_path / "one" / "checkpoints").list()[-1])
    for k in sa["model"]:
        torch.testing.assert_close(sa["model"][k], sb["model"][k], rtol=1e-4, atol=1e-6)


def test_four_phases_through_the_cli(shards, tmp_path):
    prev = None
    for phase, res in ((1, 16), (2, 16), (3, 32), (4, 32)):
        out = tmp_path / f"phase{phase}"
        init = [f"train.init_from={prev}"] if prev else []
        cli("train", "--config", f"phase{phase}", "--data", str(shards), "--out", str(out), "--steps", "2",
            f"data.resolution={res}", "data.num_workers=0", "train.sample_every=0", *TINY, *init)
        state = load_checkpoint(CheckpointManager(out / "checkpoints").list()[-1])
        assert state["step"] == 2 and state["data_info"]["latent_size"] == res
        prev = out
    assert state["model_config"]["pos_interp_scale"] == 2.0 and state["model"]["pos_embed"].shape[1] == 256
