"""MDS shards in the published layout, written by streaming's own MDSWriter, as training data."""
import functools
import importlib.util
import json
import os
import subprocess
import sys
import types

import numpy as np
import pytest
import torch

from microdit.data import shards as S
from microdit.data.loader import ShardLoader, open_dataset
from microdit.data.mds import MDSDataset, is_mds_folder, read_mds_index

INSTALL = "pip install --no-deps mosaicml-streaming xxhash zstd python-snappy cramjam Brotli catalogue"
C, N = 4, 20
COUNTS = {"0": 12, "1": 8}  # two writer processes' folders, as the published precompute makes


@functools.cache
def streaming_writer():
    """(MDSWriter, merge_index) of mosaicml-streaming, or skip with the install line."""
    spec = importlib.util.find_spec("streaming")
    if spec is None:
        pytest.skip(f"mosaicml-streaming is not installed ({INSTALL})")
    if "streaming" not in sys.modules and importlib.util.find_spec("torchvision") is None:
        # streaming's package __init__ imports its vision datasets, which need torchvision; the
        # writer does not, so load its modules without that __init__.
        pkg = types.ModuleType("streaming")
        pkg.__path__, pkg.__spec__ = list(spec.submodule_search_locations), spec
        sys.modules["streaming"] = pkg
    try:
        from streaming.base.format.mds.writer import MDSWriter
        from streaming.base.util import merge_index
    except ImportError as e:
        pytest.skip(f"mosaicml-streaming's MDSWriter does not import here ({e}); {INSTALL}")
    return MDSWriter, merge_index


def sample_arrays(n=N, seed=0):
    rng = np.random.default_rng(seed)
    return {"latents_256": rng.standard_normal((n, C, 32, 32)).astype(np.float16),
            "latents_512": rng.standard_normal((n, C, 64, 64)).astype(np.float16),
            "caption_latents": rng.standard_normal((n, 77, 1024)).astype(np.float16),
            "caption": [f"caption number {i}" + " long" * (i % 4) for i in range(n)]}


def write_mds(root, data, columns=("caption", "caption_latents", "latents_256", "latents_512")):
    """The published precompute's layout: per-process folders of MDS shards and a merged index.json."""
    MDSWriter, merge_index = streaming_writer()
    encodings = {c: "str" if c == "caption" else "bytes" for c in columns}
    start = 0
    for sub, count in COUNTS.items():
        with MDSWriter(out=str(root / sub), columns=encodings, compression=None, size_limit=700_000) as w:
            for i in range(start, start + count):
                w.write({c: data[c][i] if c == "caption" else data[c][i].reshape(-1).tobytes() for c in columns})
        start += count
    merge_index([str(root / sub / "index.json") for sub in COUNTS], out=str(root), keep_local=True)
    return root


def write_ours(root, data, resolution=256, shard=7):
    """The same samples, in the same order, as our safetensors shards."""
    root.mkdir(parents=True)
    shards = []
    for j, lo in enumerate(range(0, N, shard)):
        hi = min(lo + shard, N)
        t = {f"latents_{resolution}": torch.from_numpy(data[f"latents_{resolution}"][lo:hi]),
             "caption_states": torch.from_numpy(data["caption_latents"][lo:hi]),
             "caption_mask": torch.ones(hi - lo, 77, dtype=torch.bool)}
        meta = {"keys": json.dumps([str(i) for i in range(lo, hi)]), "captions": json.dumps(data["caption"][lo:hi]),
                "skipped": "[]"}
        name = S.SHARD_PATTERN.format(j)
        sha, size = S.write_shard(root / name, t, meta)
        shards.append({"file": name, "samples": hi - lo, "skipped": 0, "bytes": size, "sha256": sha})
    g = resolution // 8
    S.atomic_write_json(root / S.INDEX, {
        "format": S.FORMAT, "version": S.VERSION, "resolutions": [resolution], "num_samples": N, "shards": shards,
        "tensors": {f"latents_{resolution}": {"shape": [C, g, g], "dtype": "F16"},
                    "caption_states": {"shape": [77, 1024], "dtype": "F16"},
                    "caption_mask": {"shape": [77], "dtype": "BOOL"}}})
    return root


@pytest.fixture(scope="module")
def data():
    return sample_arrays()


@pytest.fixture(scope="module")
def mds(tmp_path_factory, data):
    return write_mds(tmp_path_factory.mktemp("mds"), data)


def test_reads_what_mdswriter_wrote(mds, data):
    assert is_mds_folder(mds) and is_mds_folder(mds / "0") and not is_mds_folder(mds / "0" / "shard.00000.mds")
    with pytest.raises(S.ShardError, match=r"resolutions \[256, 512\].*data.resolution"):
        MDSDataset(mds)
    ds = open_dataset(mds, 512)
    assert isinstance(ds, MDSDataset) and len(ds) == N and len(ds.shards) > len(COUNTS)
    order = [19, 0, 12, 11, 5, 5]
    b = ds.get_batch(order)
    torch.testing.assert_close(b["latents"], torch.from_numpy(data["latents_512"][order]).float(), rtol=0, atol=0)
    torch.testing.assert_close(b["caption_states"], torch.from_numpy(data["caption_latents"][order]).float(),
                               rtol=0, atol=0)
    assert b["caption_mask"].all() and b["caption_mask"].shape == (6, 77)
    assert b["captions"] == [data["caption"][i] for i in order]
    assert ds[3]["latents"].shape == (C, 64, 64) and ds[3]["caption"] == data["caption"][3]
    meta = ds.metadata
    assert meta["codec"]["spec"] == "stabilityai/stable-diffusion-xl-base-1.0" and meta["codec"]["channels"] == C
    assert meta["text_encoder"]["spec"] == "openclip:hf-hub:apple/DFN5B-CLIP-ViT-H-14-378"
    # one writer folder alone is a dataset too
    assert len(MDSDataset(mds / "1", 256)) == COUNTS["1"]


def test_same_batches_as_our_shards_rank_disjoint_and_resumable(mds, data, tmp_path):
    ours = write_ours(tmp_path / "ours", data)
    kw = dict(seed=3, caption_dropout=0.3, world_size=2)
    seen = []
    for rank in range(2):
        a = ShardLoader(mds, 4, rank=rank, resolution=256, **kw)
        b = ShardLoader(ours, 4, rank=rank, **kw)
        assert len(a) == len(b) == 2
        for _ in range(5):  # across an epoch boundary
            x, y = next(a), next(b)
            assert torch.equal(x["index"], y["index"]) and torch.equal(x["caption_dropped"], y["caption_dropped"])
            for k in ("latents", "caption_states", "caption_mask"):
                assert torch.equal(x[k], y[k]), k
            assert x["captions"] == y["captions"]
            if _ < 2:
                seen.append(set(x["index"].tolist()))
    assert sum(map(len, seen)) == len(set().union(*seen)) == 16  # ranks and batches disjoint in epoch 0
    # exact resume, also with worker processes (the dataset pickles without its memory maps)
    a = ShardLoader(mds, 4, resolution=256, seed=5)
    for _ in range(3):
        next(a)
    state = a.state_dict()
    expected = [next(a)["index"] for _ in range(3)]
    c = ShardLoader(mds, 4, resolution=256, seed=0, num_workers=2)
    c.load_state_dict(state)
    got = [next(c)["index"] for _ in range(3)]
    c.close()
    assert all(torch.equal(e, g) for e, g in zip(expected, got))


def test_bad_shards_are_reported_with_their_file(data, tmp_path):
    root = write_mds(tmp_path / "no512", data, columns=("caption", "caption_latents", "latents_256"))
    with pytest.raises(S.ShardError, match=r"shard .*0/shard\.00000\.mds has no column 'latents_512'"):
        MDSDataset(root, 512)
    with pytest.raises(S.ShardError, match=r"no column 'prompt_latents'"):
        MDSDataset(root, 256, caption_key="prompt")
    with pytest.raises(S.ShardError, match=r"column 'caption_latents' holds 157696 bytes .* 77 x 768"):
        MDSDataset(root, 256, caption_shape=(77, 768))
    shard = root / "1" / "shard.00001.mds"
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(S.ShardError, match=r"1/shard\.00001\.mds is truncated or altered: \d+ bytes, .*index\.json says"):
        MDSDataset(root, 256)
    shard.unlink()
    with pytest.raises(S.ShardError, match=r"1/shard\.00001\.mds is missing"):
        MDSDataset(root, 256)
    (tmp_path / "empty").mkdir()
    with pytest.raises(S.ShardError, match="empty is not an MDS dataset"):
        read_mds_index(tmp_path / "empty")


def test_a_corrupt_sample_table_is_reported(data, tmp_path):
    root = write_mds(tmp_path / "m", data)
    shard = root / "1" / "shard.00000.mds"
    raw = bytearray(shard.read_bytes())
    raw[8:12] = (int.from_bytes(raw[8:12], "little") + 3).to_bytes(4, "little")  # sample 1's start
    shard.write_bytes(bytes(raw))
    ds = MDSDataset(root, 256)  # the byte count still matches: found when the shard is first read
    j = [s["file"] for s in ds.shards].index("1/shard.00000.mds")
    ds.get_batch([0, int(ds.offsets[j]) - 1])
    with pytest.raises(S.ShardError, match=r"1/shard\.00000\.mds: sample 0's columns do not fill its bytes"):
        ds.get_batch([int(ds.offsets[j])])


@pytest.mark.slow
def test_train_on_mds_and_resume(mds, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    common = [sys.executable, "-m", "microdit.cli", "train", "--config", "demo", "--data", str(mds), "--out",
              str(tmp_path / "run"), "data.resolution=256", "model.preset=MicroDiT_Test_2", "train.global_batch=4",
              "train.micro_batch=4", "train.log_every=1", "train.tensorboard=false", "train.precision=fp32",
              "train.ckpt_every=1", "ema.enabled=false"]
    for steps, extra in ((2, []), (3, ["--resume"])):
        r = subprocess.run(common + ["--steps", str(steps), *extra], env=env, capture_output=True, text=True,
                           timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2, 3] and all(np.isfinite(m["loss/train"]) for m in lines)
    # the published encoders are not here offline: the sample grid is skipped, the run is not
    assert "sample grid skipped" in r.stderr
