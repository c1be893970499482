"""`microdit prepare`: shapes and image folders to shards, bad files, kill-and-resume, refusing to mix."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from microdit.cli import main as cli_main
from microdit.data import shards as S
from microdit.data.loader import ShardLoader
from microdit.data.prepare import PrepareError, prepare
from microdit.data.shapes import ShapesDataset
from microdit.data.sources import center_crop_resize, decode_image
from tests.data.shard_fixtures import (
    BAD_FILES, TinyTextEncoder, make_image_folder, make_manifest, make_tar_shards,
)

REPO = Path(__file__).resolve().parents[2]


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _shard_files(root: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(root.glob("shard-*.safetensors"))}


@pytest.fixture(scope="module")
def minilm():
    from microdit.data.text_encoders import get_text_encoder

    return get_text_encoder("minilm")


def test_shapes_end_to_end_with_minilm(tmp_path, minilm):
    n = 24
    summary = prepare("shapes", tmp_path / "out", num=n, seed=3, shard_size=10, workers=1, text_encoder=minilm,
                      batch_size=8, progress=False)
    assert summary["written"] == n and summary["skipped"] == 0 and summary["skipped_items"] == []
    assert summary["shards"] == 3 and summary["shards_written"] == 3
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["written"] == n
    index = S.read_index(tmp_path / "out")
    assert index["codec"]["name"] == "pixels" and index["text_encoder"]["name"] == "minilm"
    assert index["tensors"]["latents_32"] == {"shape": [3, 32, 32], "dtype": "F16"}
    assert index["tensors"]["caption_states"] == {"shape": [77, 384], "dtype": "F16"}
    assert [s["samples"] for s in index["shards"]] == [10, 10, 4]

    ds = S.ShardDataset(tmp_path / "out", verify=True)
    shapes = ShapesDataset(n, resolution=32, seed=3)
    loader = ShardLoader(tmp_path / "out", batch_size=8, seed=1)
    seen = []
    for _ in range(len(loader)):
        b = next(loader)
        assert b["latents"].shape == (8, 3, 32, 32) and b["latents"].dtype == torch.float32
        assert b["caption_states"].shape == (8, 77, 384) and b["caption_mask"].dtype == torch.bool
        images = ds.codec().decode(b["latents"])  # pixels are stored exactly
        for j, i in enumerate(b["index"].tolist()):
            np.testing.assert_array_equal(images[j].numpy(), shapes[i]["image"])
            assert b["captions"][j] == shapes[i]["caption"]
        seen += b["index"].tolist()
    assert sorted(seen) == list(range(n))
    states, mask = minilm.encode([shapes[i]["caption"] for i in range(4)])
    item_states = torch.stack([ds[i]["caption_states"] for i in range(4)])
    assert torch.equal(torch.stack([ds[i]["caption_mask"] for i in range(4)]), mask)
    torch.testing.assert_close(item_states, states, atol=2e-3, rtol=2e-3)  # float16 storage


def test_image_folder_to_shards_keeps_centre_crops(tmp_path):
    good = make_image_folder(tmp_path / "imgs", n_good=6)
    summary = prepare(tmp_path / "imgs", tmp_path / "out", resolutions=[16], text_encoder=TinyTextEncoder(),
                      shard_size=4, workers=0, progress=False)
    assert summary["written"] == 6 and summary["skipped"] == 0
    ds = S.ShardDataset(tmp_path / "out")
    assert ds.keys == [g.rsplit(".", 1)[0] for g in good]
    images = ds.codec().decode(ds.get_batch(range(6))["latents"]).numpy()
    for k, rel in enumerate(good):
        path = tmp_path / "imgs" / rel
        np.testing.assert_array_equal(images[k], decode_image(path.read_bytes(), str(path), (16,), 8)[16])
        if not rel.endswith(".jpg"):  # JPEGs decode at a reduced scale first (draft mode)
            with Image.open(path) as im:
                np.testing.assert_array_equal(images[k], center_crop_resize(im.convert("RGB"), 16))
        assert ds[k]["caption"] == f"a picture number {int(Path(rel).stem[3:])}"


def test_bad_files_reported_and_exit_zero(tmp_path):
    make_image_folder(tmp_path / "imgs", n_good=3, bad=True)
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "microdit.cli", "prepare", str(tmp_path / "imgs"), str(out),
                           "--resolution", "16", "--text-encoder", "minilm", "--workers", "1", "--no-progress"],
                          capture_output=True, text=True, env=_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["written"] == 3 and summary["skipped"] == len(BAD_FILES)
    reasons = {Path(s["path"]).name: s["reason"] for s in summary["skipped_items"]}
    assert set(reasons) == set(BAD_FILES)
    for name, word in BAD_FILES.items():
        assert word in reasons[name]
        assert name in proc.stderr  # each skip is also reported on the terminal
    assert json.loads(proc.stdout.strip().splitlines()[-1])["written"] == 3
    assert len(S.ShardDataset(out)) == 3


_KILL_SCRIPT = """
import sys
from microdit.data.prepare import prepare
from tests.data.shard_fixtures import TinyTextEncoder
prepare("shapes", sys.argv[1], num=400, seed=1, shard_size=16, workers=1, text_encoder=TinyTextEncoder(),
        batch_size=8, progress=False)
"""


def test_kill_midway_then_rerun_gives_the_clean_run_shards(tmp_path):
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-c", _KILL_SCRIPT, str(out)], env=_env(), cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not (out / "shard-00000.safetensors").exists():
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.monotonic() < deadline
        time.sleep(0.002)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    assert not (out / S.INDEX).exists()  # killed midway
    n_before = len(_shard_files(out))
    assert 1 <= n_before < 25
    before = _shard_files(out)

    resumed = prepare("shapes", out, num=400, seed=1, shard_size=16, workers=1, text_encoder=TinyTextEncoder(),
                      batch_size=8, progress=False)
    assert resumed["shards_resumed"] >= n_before and resumed["shards"] == 25
    assert not list(out.glob(f"*{S.TMP_MARK}*"))
    after = _shard_files(out)
    assert all(after[k] == v for k, v in before.items())  # finished shards were kept

    clean = tmp_path / "clean"
    prepare("shapes", clean, num=400, seed=1, shard_size=16, workers=0, text_encoder=TinyTextEncoder(),
            batch_size=8, progress=False)
    assert after == _shard_files(clean)
    assert (out / S.INDEX).read_bytes() == (clean / S.INDEX).read_bytes()
    S.ShardDataset(out, verify=True)


def test_rerun_of_a_finished_dataset_is_a_noop(tmp_path):
    kw = dict(num=20, shard_size=8, workers=0, text_encoder=TinyTextEncoder(), progress=False)
    prepare("shapes", tmp_path / "o", **kw)
    stamps = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "o").iterdir() if p.name != "summary.json"}
    again = prepare("shapes", tmp_path / "o", **kw)
    assert again["shards_written"] == 0 and again["written"] == 20 and again["items_this_run"] == 0
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "o").iterdir() if p.name != "summary.json"} == stamps


def test_refuses_to_mix_settings(tmp_path, capsys):
    kw = dict(num=8, shard_size=8, workers=0, text_encoder=TinyTextEncoder(), progress=False)
    prepare("shapes", tmp_path / "o", **kw)
    with pytest.raises(PrepareError, match=r"resolutions: \[32\] there, \[16\] now"):
        prepare("shapes", tmp_path / "o", resolutions=[16], **kw)
    with pytest.raises(PrepareError, match="source.seed"):
        prepare("shapes", tmp_path / "o", **kw, seed=5)

    class Other(TinyTextEncoder):
        def metadata(self):
            return {**super().metadata(), "fingerprint": "different"}

    # The same encoder name with other weights, into a dataset with work left, is refused.
    (tmp_path / "o" / "shard-00000.safetensors").unlink()
    with pytest.raises(PrepareError, match="other encoders.*fingerprint"):
        prepare("shapes", tmp_path / "o", **dict(kw, text_encoder=Other()))
    # The CLI says so and exits 2.
    assert cli_main(["prepare", "shapes", str(tmp_path / "o"), "--num", "8", "--resolution", "16",
                     "--no-progress"]) == 2
    assert "other settings" in capsys.readouterr().err
    # A folder that changed since the first run is not resumed into shards of the old listing.
    make_image_folder(tmp_path / "imgs", n_good=4)
    prepare(tmp_path / "imgs", tmp_path / "o_imgs", resolutions=[16], **kw)
    make_image_folder(tmp_path / "imgs", n_good=5)
    with pytest.raises(PrepareError, match="listing_sha256"):
        prepare(tmp_path / "imgs", tmp_path / "o_imgs", resolutions=[16], **kw)
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "shard-00000.safetensors").write_bytes(b"x")
    with pytest.raises(PrepareError, match="not made by"):
        prepare("shapes", tmp_path / "foreign", **kw)


def test_two_resolutions_bfloat16_and_parallel_workers_agree(tmp_path):
    kw = dict(num=12, shard_size=5, text_encoder=TinyTextEncoder(), progress=False, resolutions=[16, 32],
              dtype="bfloat16")
    prepare("shapes", tmp_path / "w0", workers=0, **kw)
    prepare("shapes", tmp_path / "w2", workers=2, **kw)
    assert _shard_files(tmp_path / "w0") == _shard_files(tmp_path / "w2")
    with pytest.raises(S.ShardError, match="resolutions"):
        S.ShardDataset(tmp_path / "w0")
    for r in (16, 32):
        ds = S.ShardDataset(tmp_path / "w0", resolution=r)
        assert ds[0]["latents"].shape == (3, r, r)
        # bfloat16 keeps 8 bits: pixels come back within half a grey level.
        img = ShapesDataset(12, resolution=r)[7]["image"]
        back = (ds[7]["latents"].permute(1, 2, 0) + 1) * 127.5
        assert (back - torch.from_numpy(img).float()).abs().max() <= 0.5 + 1e-6
    assert S.read_index(tmp_path / "w0")["tensors"]["latents_16"]["dtype"] == "BF16"


def test_webdataset_and_manifest_sources_prepare(tmp_path):
    keys = make_tar_shards(tmp_path / "wds", n=7, per_tar=4)
    s = prepare(tmp_path / "wds", tmp_path / "o_wds", resolutions=[16], text_encoder=TinyTextEncoder(),
                workers=0, progress=False)
    assert s["written"] == 7 and s["skipped"] == 2
    ds = S.ShardDataset(tmp_path / "o_wds")
    assert ds.keys == keys and ds.captions == [f"tar caption {int(k)}" for k in keys]
    for kind in ("jsonl", "csv"):
        path, captions = make_manifest(tmp_path / kind, kind)
        s = prepare(path, tmp_path / f"o_{kind}", resolutions=[16], text_encoder=TinyTextEncoder(), workers=0,
                    progress=False)
        assert S.ShardDataset(tmp_path / f"o_{kind}").captions == captions
        assert s["skipped"] == (2 if kind == "jsonl" else 1)


def test_stale_temp_and_damaged_shard_are_redone(tmp_path):
    kw = dict(num=20, shard_size=8, workers=0, text_encoder=TinyTextEncoder(), progress=False)
    prepare("shapes", tmp_path / "clean", **kw)
    out = tmp_path / "o"
    prepare("shapes", out, **kw)
    (out / S.INDEX).unlink()
    (out / "shard-00001.safetensors").write_bytes(b"garbage")
    (out / f"shard-00002.safetensors{S.TMP_MARK}999").write_bytes(b"half a shard")
    s = prepare("shapes", out, **kw)
    assert s["shards_written"] == 1 and s["shards_resumed"] == 2
    assert _shard_files(out) == _shard_files(tmp_path / "clean")
    assert not list(out.glob(f"*{S.TMP_MARK}*"))
