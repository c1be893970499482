"""`microdit eval --protocol` end to end on the CPU: a tiny model trained a few steps on shapes, the
shapes shards as the reference, the tiny local Inception and CLIP; report written, and a crashed
run resumed (under torchrun, 2 ranks) to the same images and numbers."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from microdit.eval import protocol as P

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "MICRODIT_OFFLINE": "1"}


def cli(*args, nproc=1):
    cmd = ([sys.executable, "-m", "microdit.cli"] if nproc == 1 else
           [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m", "microdit.cli"])
    r = subprocess.run(cmd + list(args), env=ENV, capture_output=True, text=True, timeout=900)
    errors = [line for line in r.stderr.splitlines() if "Error" in line or "error:" in line]
    assert r.returncode == 0, f"{' '.join(args[:3])} failed:\n" + "\n".join(errors[:10]) + r.stderr[-2000:]
    return r


@pytest.fixture(scope="module")
def run_and_shards(tmp_path_factory):
    from microdit.data.text_encoders import get_text_encoder
    from microdit.data.prepare import prepare

    root = tmp_path_factory.mktemp("protocol")
    shards = root / "shards"
    prepare("shapes", shards, resolutions=(16,), codec="pixels", text_encoder=get_text_encoder("minilm", max_length=16),
            num=24, seed=0, progress=False)
    cli("train", "--config", "demo", "--data", str(shards), "--out", str(root / "run"), "--steps", "3",
        "data.resolution=16", "model.preset=MicroDiT_Test_2", "train.global_batch=8", "train.micro_batch=8",
        "train.tensorboard=false", "train.sample_steps=1", "train.precision=fp32")
    return root / "run", shards


@pytest.mark.slow  # ~2.5 min on 2 cores: training, 2 protocol runs (one under torchrun)
def test_protocol_end_to_end_and_resume(run_and_shards, inception_weights, tiny_clip, tmp_path):
    run, shards = run_and_shards
    proto = {"base": "shapes", "name": "tiny-shapes", "captions": {"file": "shapes_eval:6:0"},
             "sampler": {"steps": 2, "batch_size": 4},
             "metrics": {"fid": True, "kid": True, "kid_subset_size": 4, "kid_subsets": 5, "clip": True,
                         "inception": str(inception_weights), "clip_model": str(tiny_clip), "shapes_eval": True}}
    (tmp_path / "proto.yaml").write_text(json.dumps(proto))  # JSON is YAML
    common = ["eval", str(run), "--protocol", str(tmp_path / "proto.yaml"), "--reference", str(shards),
              "--cache-dir", str(tmp_path / "cache")]
    cli(*common, "--out", str(tmp_path / "a"))
    a = json.loads((tmp_path / "a" / "report.json").read_text())
    assert set(a["metrics"]) >= {"fid", "kid_mean", "kid_std", "clip_score", "shapes_eval"}
    assert a["images"] == {**a["images"], "total": 6, "generated": 6, "reused": 0}
    assert a["protocol"]["sampler"]["steps"] == 2 and a["protocol"]["metrics"]["clip_model"] == str(tiny_clip)
    assert len(a["checkpoint_sha256"]) == 64 and a["elapsed_s"]["total"] > 0
    assert a["metric_models"]["inception"]["library"] == "torch-fidelity"
    assert a["metric_models"]["reference"]["count"] == 24 and len(list((tmp_path / "cache").glob("ref-*.npz"))) == 1
    md = (tmp_path / "a" / "report.md").read_text()
    assert a["checkpoint_sha256"] in md and "| fid |" in md

    # A crash: three images and their manifest lines kept, a torn last line, a half-written PNG.
    b = tmp_path / "b"
    shutil.copytree(tmp_path / "a", b)
    (b / "report.json").unlink()
    lines = (b / "manifest.rank0.jsonl").read_text().splitlines()
    kept = [json.loads(x) for x in lines[:3]]
    (b / "manifest.rank0.jsonl").write_text("\n".join(lines[:3]) + "\n" + lines[3][:20])
    for p in (b / "images").glob("*.png"):
        if p.name not in {r["file"] for r in kept}:
            p.unlink()
    (b / "images" / ".000005.png.tmp").write_bytes(b"\x89PNG partial")
    cli(*common, "--out", str(b), nproc=2)
    rb = json.loads((b / "report.json").read_text())
    assert rb["images"]["reused"] == 3 and rb["images"]["generated"] == 3
    assert rb["metrics"] == a["metrics"]
    for i in range(6):
        name = f"{i:06d}.png"
        assert (b / "images" / name).read_bytes() == (tmp_path / "a" / "images" / name).read_bytes(), name


def test_protocol_errors(tmp_path):
    with pytest.raises(P.ProtocolError, match="unknown key 'stepz'"):
        P.load_protocol("coco30k", {"sampler": {"stepz": 3}})
    with pytest.raises(P.ProtocolError, match="not a built-in"):
        P.load_protocol(str(tmp_path / "missing.yaml"))
    with pytest.raises(P.ProtocolError, match="no metric"):
        P.load_protocol("shapes", {"metrics": {"shapes_eval": False}})
    assert P.protocol_hash(P.load_protocol("coco30k")) != P.protocol_hash(P.load_protocol("coco30k", {"sampler": {"seed": 1}}))


def test_captions_formats_and_coco_selection(tmp_path):
    coco = {"annotations": [{"image_id": i // 5, "id": i, "caption": f"caption {i}"} for i in range(50)]}
    (tmp_path / "captions_val2014.json").write_text(json.dumps(coco))
    rows, sha = P.read_captions(str(tmp_path / "captions_val2014.json"))
    assert len(rows) == 50 and len(sha) == 64 and rows[7] == ("7", "caption 7", "1")
    picked = P.select_captions(rows, 4, "random_one_per_image", 0)
    assert len({r[2] for r in picked}) == 4 and picked == P.select_captions(rows, 4, "random_one_per_image", 0)
    (tmp_path / "c.txt").write_text("a red circle\n\nblue square\n")
    assert [r[1] for r in P.read_captions(str(tmp_path / "c.txt"))[0]] == ["a red circle", "blue square"]
    (tmp_path / "c.jsonl").write_text('{"id": "x1", "text": "green  triangle"}\n')
    assert P.read_captions(str(tmp_path / "c.jsonl"))[0] == [("x1", "green triangle", "x1")]
    (tmp_path / "bad.jsonl").write_text('{"id": 1}\n')
    with pytest.raises(P.ProtocolError, match="entry 0 has no caption"):
        P.read_captions(str(tmp_path / "bad.jsonl"))


@pytest.mark.slow  # a training run with validation, FID-K and CLIP score (tiny local models)
def test_training_validation_with_fid_and_clip(run_and_shards, inception_weights, tiny_clip, tmp_path):
    from microdit import availability

    _, shards = run_and_shards
    out = tmp_path / "run"
    cli("train", "--config", "demo", "--data", str(shards), "--out", str(out), "--steps", "2", "data.resolution=16",
        "model.preset=MicroDiT_Test_2", "train.global_batch=6", "train.micro_batch=6", "train.sample_steps=1",
        "train.precision=fp32", "data.val_fraction=0.25", "val.every=1", "val.fid_every=2", "val.fid_samples=4",
        "val.fid_steps=1", f"val.inception={inception_weights}", f"val.clip_model={tiny_clip}")
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    val = {r["step"]: r for r in rows if "loss/val" in r}
    assert sorted(val) == [0, 1, 2]
    assert {"eval/fid_k", "eval/clip_score"} <= val[0].keys() and {"eval/fid_k", "eval/clip_score"} <= val[2].keys()
    assert "eval/fid_k" not in val[1] and val[0]["eval/fid_k"] > 0
    if availability.tensorboard():
        assert list((out / "tb").glob("events.out.tfevents.*"))
