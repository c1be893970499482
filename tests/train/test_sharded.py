"""FSDP2 at scale: a sharded EMA without all-gathers, and DCP checkpoints resumable on another world size."""
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from microdit.models.checkpoint import load_reference
from microdit.pipeline import export
from microdit.train.checkpoint import CheckpointManager, UnsafeCheckpointError, load_checkpoint
from tests.train.test_hardening import Payload
from tests.train.test_trainer import ENV, run

EMA_SCRIPT = str(Path(__file__).with_name("run_ema_fsdp.py"))


def test_fsdp_ema_is_sharded_local_and_identical_to_unsharded():
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        EMA_SCRIPT, "3"], env=ENV, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert result["collectives_in_update"] == 0, result  # no all-gather (nor any collective) in the update
    assert result["identical"] and result["max_abs_diff"] == 0.0, result
    assert result["sharded_entries"] > 0 and result["local_numel"] < 0.6 * result["full_numel"], result


@pytest.mark.slow  # three training runs, one under torchrun: about 100 s on 2 cores
def test_dcp_written_on_two_ranks_resumes_on_one(tmp_path):
    out = tmp_path / "two"
    flags = ["train.checkpoint=dcp", "ema.enabled=true"]
    two = run(out, 4, 4, 8, "train.parallel=fsdp", *flags, nproc=2)
    assert two.returncode == 0, two.stderr[-3000:]
    ckpts = out / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step_00000002.dcp", "step_00000004.dcp"]
    assert {p.name for p in (ckpts / "step_00000002.dcp").iterdir()} >= {"__0_0.distcp", "__1_0.distcp",
                                                                         ".metadata", "trainer.pt"}
    # Drop the last checkpoint: resume from step 2, on one rank with the same global micro-batch.
    import shutil

    shutil.rmtree(ckpts / "step_00000004.dcp")
    (ckpts / "latest").write_text("step_00000002.dcp\n")
    resumed = run(out, 4, 8, 8, "--resume", *flags)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "written on 2 ranks, resuming on 1" in resumed.stderr
    assert json.loads((out / "record.json").read_text())[0]["step"] == 3
    one = run(tmp_path / "one", 4, 8, 8, "ema.enabled=true")
    assert one.returncode == 0, one.stderr[-3000:]
    a = load_checkpoint(CheckpointManager(ckpts).list()[-1])  # the DCP folder, as whole tensors
    b = load_checkpoint(CheckpointManager(tmp_path / "one" / "checkpoints").list()[-1])
    assert a["step"] == b["step"] == 4
    for k in b["model"]:  # the rank-equivalence test's tolerance
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(a["ema"]["shadow"][k], b["ema"]["shadow"][k], rtol=1e-4, atol=1e-6)
    # The published format from a DCP run, through the library function behind `microdit export`.
    published = export(out, tmp_path / "export", ema=True, format="published")
    model = load_reference(published)
    for k, v in model.state_dict().items():
        assert torch.equal(v, a["ema"]["shadow"][k].float()), k


def test_planted_dcp_metadata_never_runs(tmp_path):
    marker = tmp_path / "PWNED"
    d = tmp_path / "checkpoints" / "step_00000002.dcp"
    d.mkdir(parents=True)
    torch.save({"format": "microdit-train-checkpoint/1", "kind": "dcp", "step": 2}, d / "trainer.pt")
    (d / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    with pytest.raises(UnsafeCheckpointError, match=r"\.metadata: refused to unpickle"):
        load_checkpoint(d)
    with pytest.raises(UnsafeCheckpointError):
        CheckpointManager(tmp_path / "checkpoints").load_latest(sharded=True)
    assert not marker.exists() and os.listdir(tmp_path) == ["checkpoints"]
