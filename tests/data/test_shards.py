"""The shard format: standard safetensors, deterministic bytes, atomic writes, clear reader errors."""
import json

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from microdit.data import shards as S


def _tensors(n=3, dtype=torch.float16):
    g = torch.Generator().manual_seed(0)
    return {"latents_8": torch.randn(n, 3, 8, 8, generator=g).to(dtype),
            "caption_states": torch.randn(n, 5, 4, generator=g).to(dtype),
            "caption_mask": torch.rand(n, 5, generator=g) > 0.5}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_shard_is_standard_safetensors(tmp_path, dtype):
    t = _tensors(dtype=dtype)
    meta = {"z": "1", "a": json.dumps(["x", "y"]), "m": "é"}
    sha, size = S.write_shard(tmp_path / "s.safetensors", t, meta)
    assert size == (tmp_path / "s.safetensors").stat().st_size and sha == S.file_sha256(tmp_path / "s.safetensors")
    back = load_file(tmp_path / "s.safetensors")
    assert set(back) == set(t)
    for k in t:
        assert back[k].dtype == t[k].dtype and torch.equal(back[k], t[k])
    with safe_open(tmp_path / "s.safetensors", "pt") as f:
        assert f.metadata() == meta
    assert S.shard_metadata(tmp_path / "s.safetensors")["a"] == ["x", "y"]


def test_shard_bytes_are_deterministic_and_writes_leave_no_temp(tmp_path):
    t = _tensors()
    meta = {f"k{i}": str(i) for i in range(20)}  # many keys: hash order would shuffle them
    a = S.write_shard(tmp_path / "a.safetensors", t, meta)
    b = S.write_shard(tmp_path / "b.safetensors", dict(reversed(list(t.items()))), dict(reversed(list(meta.items()))))
    assert a == b
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()
    with pytest.raises(TypeError):
        S.write_shard(tmp_path / "c.safetensors", {"x": torch.zeros(2, dtype=torch.complex64)}, {})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors", "b.safetensors"]


def test_empty_shard_round_trips(tmp_path):
    S.write_shard(tmp_path / "e.safetensors", _tensors(0), {})
    assert load_file(tmp_path / "e.safetensors")["latents_8"].shape == (0, 3, 8, 8)


def test_truncated_shard_is_detected(tmp_path):
    S.write_shard(tmp_path / "s.safetensors", _tensors(), {})
    data = (tmp_path / "s.safetensors").read_bytes()
    (tmp_path / "s.safetensors").write_bytes(data[:-5])
    with pytest.raises(S.ShardError, match="truncated"):
        S.read_header(tmp_path / "s.safetensors")
    (tmp_path / "s.safetensors").write_bytes(b"\x01")
    with pytest.raises(S.ShardError, match="unreadable"):
        S.read_header(tmp_path / "s.safetensors")


def _dataset(root, shard_counts=(3, 0, 2), dtype=torch.float16):
    root.mkdir(parents=True, exist_ok=True)
    shards, n = [], 0
    for j, c in enumerate(shard_counts):
        t = _tensors(c, dtype)
        t["latents_8"] = (torch.arange(c, dtype=torch.float32) + n).reshape(c, 1, 1, 1).expand(c, 3, 8, 8).to(dtype)
        meta = {"keys": json.dumps([f"k{n + i}" for i in range(c)]),
                "captions": json.dumps([f"caption {n + i}" for i in range(c)]), "skipped": "[]"}
        name = S.SHARD_PATTERN.format(j)
        sha, size = S.write_shard(root / name, t, meta)
        shards.append({"file": name, "samples": c, "skipped": 0, "bytes": size, "sha256": sha})
        n += c
    code = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32"}[dtype]
    index = {"format": S.FORMAT, "version": S.VERSION, "resolutions": [8], "num_samples": n,
             "tensors": {"latents_8": {"shape": [3, 8, 8], "dtype": code},
                         "caption_states": {"shape": [5, 4], "dtype": code},
                         "caption_mask": {"shape": [5], "dtype": "BOOL"}},
             "shards": shards}
    S.atomic_write_json(root / S.INDEX, index)
    return index


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_shard_dataset_reads_across_shards(tmp_path, dtype):
    _dataset(tmp_path / "d", dtype=dtype)
    ds = S.ShardDataset(tmp_path / "d", verify=True)
    assert len(ds) == 5 and ds.resolution == 8
    item = ds[4]
    assert item["latents"].dtype == torch.float32 and item["latents"].shape == (3, 8, 8)
    assert float(item["latents"][0, 0, 0]) == 4.0 and item["caption"] == "caption 4" and item["key"] == "k4"
    assert item["caption_mask"].dtype == torch.bool and item["caption_states"].dtype == torch.float32
    b = ds.get_batch([4, 0, 3, 3])
    assert b["latents"][:, 0, 0, 0].tolist() == [4.0, 0.0, 3.0, 3.0] and b["index"].tolist() == [4, 0, 3, 3]
    assert ds[-1]["key"] == "k4"
    with pytest.raises(IndexError):
        ds[5]


def test_shard_dataset_errors(tmp_path):
    with pytest.raises(S.ShardError, match="does not exist"):
        S.ShardDataset(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(S.ShardError, match="microdit prepare SOURCE OUT"):
        S.ShardDataset(tmp_path / "empty")
    index = _dataset(tmp_path / "d")
    (tmp_path / "d" / S.INDEX).unlink()
    with pytest.raises(S.ShardError, match="did not finish"):
        S.ShardDataset(tmp_path / "d")
    S.atomic_write_json(tmp_path / "d" / S.INDEX, dict(index, version=99))
    with pytest.raises(S.ShardError, match="version 99"):
        S.ShardDataset(tmp_path / "d")
    S.atomic_write_json(tmp_path / "d" / S.INDEX, dict(index, format="mds"))
    with pytest.raises(S.ShardError, match="format 'mds'"):
        S.ShardDataset(tmp_path / "d")
    S.atomic_write_json(tmp_path / "d" / S.INDEX, index)
    with pytest.raises(S.ShardError, match="no resolution 16"):
        S.ShardDataset(tmp_path / "d", resolution=16)
    S.atomic_write_json(tmp_path / "d" / S.INDEX, dict(index, resolutions=[8, 16]))
    with pytest.raises(S.ShardError, match=r"pass resolution="):
        S.ShardDataset(tmp_path / "d")


def test_checksum_failure_names_the_shard(tmp_path):
    _dataset(tmp_path / "d")
    path = tmp_path / "d" / "shard-00002.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    S.ShardDataset(tmp_path / "d")  # verification is optional
    with pytest.raises(S.ChecksumError, match="shard-00002.safetensors fails its checksum"):
        S.ShardDataset(tmp_path / "d", verify=True)
    path.unlink()
    with pytest.raises(S.ShardError, match="missing shard files: shard-00002"):
        S.ShardDataset(tmp_path / "d")


def test_storage_dtype_names():
    assert S.storage_code("bfloat16") == "BF16"
    with pytest.raises(ValueError, match="float8"):
        S.storage_code("float8")
    assert np.dtype(np.float16).itemsize == 2
