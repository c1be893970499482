"""Shards are checked when opened (headers, counts) and hashed before their batches are trained on."""
import json
import shutil
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from microdit.cli import main as microdit_main
from microdit.data import shards as S
from microdit.data.loader import ShardLoader
from microdit.data.prepare import prepare
from tests.data.shard_fixtures import TinyTextEncoder


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    out = tmp_path_factory.mktemp("checks") / "shapes"
    prepare("shapes", out, num=48, seed=1, resolutions=[16], shard_size=16, workers=0,
            text_encoder=TinyTextEncoder(), progress=False)
    return out


def _copy(clean, tmp_path) -> Path:
    return Path(shutil.copytree(clean, tmp_path / "d"))


def flip(path, n=4096):
    """Invert `n` bytes in the middle of a shard's tensor data (its header stays valid)."""
    _, _, start = S.read_header(path)
    data = bytearray(path.read_bytes())
    mid = start + (len(data) - start) // 2
    for i in range(mid - min(n, len(data) - start) // 2, mid + min(n, len(data) - start) // 2):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("delta", [+1, -1], ids=["index-says-more", "index-says-fewer"])
def test_sample_counts_are_checked_on_open(clean, tmp_path, delta):
    root = _copy(clean, tmp_path)
    index = json.loads((root / S.INDEX).read_text())
    index["shards"][1]["samples"] += delta
    index["num_samples"] += delta
    S.atomic_write_json(root / S.INDEX, index)
    with pytest.raises(S.ShardError, match=r"shard-00001.safetensors: tensor 'latents_16' is F16 \[16,"):
        S.ShardDataset(root)


def test_caption_count_is_checked_on_open(clean, tmp_path):
    root = _copy(clean, tmp_path)
    path = root / "shard-00002.safetensors"
    _, meta, _ = S.read_header(path)
    meta = dict(meta, captions=json.dumps(json.loads(meta["captions"])[:-1]))  # one caption lost
    sha, size = S.write_shard(path, load_file(str(path)), meta)
    index = json.loads((root / S.INDEX).read_text())
    index["shards"][2].update(sha256=sha, bytes=size)
    S.atomic_write_json(root / S.INDEX, index)
    with pytest.raises(S.ShardError, match="shard-00002.safetensors holds 15 captions, index.json records 16"):
        S.ShardDataset(root)


def test_flipped_bytes_stop_the_first_batch(clean, tmp_path):
    root = _copy(clean, tmp_path)
    flip(root / "shard-00001.safetensors")
    S.ShardDataset(root)  # header and counts are intact: opening is cheap and succeeds
    for verify in ("background", True):
        with pytest.raises(S.ChecksumError, match="shard-00001.safetensors fails its checksum"):
            next(ShardLoader(root, 8, verify=verify))
    next(ShardLoader(root, 8, verify="off"))  # the switch for datasets too large to hash


def test_a_bad_shard_found_in_the_background_stops_the_next_batch(clean, tmp_path):
    root = _copy(clean, tmp_path)
    flip(root / "shard-00002.safetensors")
    loader = ShardLoader(root, 4, shuffle=False)  # the first batches come from shard 0 only
    deadline = time.time() + 30
    while not loader._verifier.done and time.time() < deadline:
        time.sleep(0.01)
    with pytest.raises(S.ChecksumError, match="shard-00002.safetensors"):
        next(loader)


def test_train_reports_a_corrupt_shard_before_the_first_step(clean, tmp_path, capsys):
    root = _copy(clean, tmp_path)
    flip(root / "shard-00000.safetensors")
    out = tmp_path / "run"
    code = microdit_main(["train", "--data", str(root), "--out", str(out), "--steps", "2", "data.resolution=16",
                          "model.preset=MicroDiT_Test_2", "train.micro_batch=4", "train.global_batch=4",
                          "train.tensorboard=false"])
    err = capsys.readouterr().err
    assert code == 1 and "microdit: error: shard" in err and "shard-00000.safetensors fails its checksum" in err
    metrics = out / "metrics.jsonl"
    assert not (metrics.exists() and metrics.read_text().strip()), "a step was trained on corrupt data"
    assert not (out / "checkpoints").exists()


def test_train_takes_yaml11_float_overrides(clean, tmp_path, capsys, monkeypatch):
    from microdit.train.trainer import Trainer

    monkeypatch.setattr(Trainer, "sample_grid", lambda self: None)  # the test text encoder cannot be rebuilt
    out = tmp_path / "run"
    code = microdit_main(["train", "--data", str(clean), "--out", str(out), "optim.lr=1e-4", "train.steps=3",
                          "data.resolution=16", "model.preset=MicroDiT_Test_2", "train.micro_batch=4",
                          "train.global_batch=4", "train.tensorboard=false", "train.log_every=1"])
    assert code == 0, capsys.readouterr().err[-2000:]
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in steps] == [1, 2, 3] and json.loads((out / "config.json").read_text())["optim"]["lr"] == 1e-4
