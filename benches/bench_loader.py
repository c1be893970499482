"""Loader throughput over prepared shards: samples/s and MB/s for ShardLoader (0 and 2 workers) and DALI.

The bench prepares 4096 Shapes samples at 32 px in a temporary folder (pixels codec; caption
states of MiniLM's shape, 77 x 384, from a fast stand-in encoder so that preparing takes seconds)
and then draws batches of 256 with caption dropout 0.1. MB/s counts the shard bytes delivered
(storage dtype, float16: latents, caption states and mask), i.e. what the page cache or disk
must supply. Run: `python -m benches.bench_loader` (prints a table, writes
benches/results/loader.json), or under pytest-benchmark: `pytest benches/bench_loader.py`.
"""
from __future__ import annotations

import json
import platform
import tempfile
import time
from pathlib import Path

import pytest
import torch

from microdit.bench.timing import git_commit
from microdit.availability import dali_reasons
from microdit.data.loader import ShardLoader
from microdit.data.prepare import prepare
from microdit.data.shards import ShardDataset

NUM, RESOLUTION, BATCH, BATCHES = 4096, 32, 256, 48


class _StandInText:
    """MiniLM-shaped caption states (77 x 384) without running a transformer."""

    name, dim, max_length = "standin-77x384", 384, 77

    def encode(self, captions):
        n = len(captions)
        lengths = torch.tensor([min(len(c.split()) + 2, self.max_length) for c in captions])
        mask = torch.arange(self.max_length)[None] < lengths[:, None]  # (N, L)
        g = torch.Generator().manual_seed(n)
        return torch.randn(n, self.max_length, self.dim, generator=g) * mask[..., None], mask

    def metadata(self):
        return {"name": self.name, "dim": self.dim, "max_length": self.max_length}

    def to(self, device):
        return self


def _kinds() -> list[str]:
    kinds = ["shard_w0", "shard_w2"]
    if not dali_reasons("cpu"):
        kinds.append("dali_cpu")
    if not dali_reasons("cuda"):
        kinds.append("dali_gpu")
    return kinds


def _loader(kind: str, root):
    kw = dict(batch_size=BATCH, seed=0, caption_dropout=0.1)
    if kind.startswith("shard"):
        return ShardLoader(root, num_workers=int(kind[-1]), **kw)
    from microdit.data.dali import DALILoader

    return DALILoader(root, device_id=0 if kind == "dali_gpu" else None, num_threads=2, **kw)


def _sample_bytes(root) -> int:
    spec = ShardDataset(root).tensor_specs()
    size = {"F16": 2, "BF16": 2, "F32": 4, "BOOL": 1}
    return sum(size[s["dtype"]] * int(torch.tensor(s["shape"]).prod()) for s in spec.values())


def _make(root: Path) -> dict:
    t0 = time.perf_counter()
    summary = prepare("shapes", root, num=NUM, resolutions=[RESOLUTION], shard_size=1024, workers=None,
                      text_encoder=_StandInText(), batch_size=256, progress=False)
    return {"prepare_seconds": time.perf_counter() - t0, "prepare_items_per_s": summary["items_per_s"]}


def _measure(kind: str, root, per_sample: int) -> dict:
    loader = _loader(kind, root)
    for _ in range(3):  # workers start, memory maps open, DALI builds
        next(loader)
    t0 = time.perf_counter()
    for _ in range(BATCHES):
        batch = next(loader)
    if batch["latents"].is_cuda:
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    if hasattr(loader, "close"):
        loader.close()
    samples = BATCHES * BATCH
    return {"loader": kind, "samples_per_s": samples / dt, "MB_per_s": samples * per_sample / dt / 1e6,
            "seconds": dt}


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench_loader") / "shapes"
    _make(root)
    return root


@pytest.mark.parametrize("kind", _kinds())
def test_loader_throughput(benchmark, shards, kind):
    per_sample = _sample_bytes(shards)
    result = benchmark.pedantic(_measure, args=(kind, shards, per_sample), rounds=1, iterations=1)
    benchmark.extra_info.update(result)


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "shapes"
        prep = _make(root)
        per_sample = _sample_bytes(root)
        rows = [_measure(kind, root, per_sample) for kind in _kinds()]
    print(f"prepare: {NUM} samples in {prep['prepare_seconds']:.1f} s ({prep['prepare_items_per_s']:.0f} items/s)")
    print(f"{'loader':<10} {'samples/s':>10} {'MB/s':>8}   ({per_sample / 1024:.1f} KiB per sample, batch {BATCH})")
    for r in rows:
        print(f"{r['loader']:<10} {r['samples_per_s']:>10.0f} {r['MB_per_s']:>8.1f}")
    out = {"device": f"{platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)",
           "torch": torch.__version__, "commit": git_commit(), "num_samples": NUM, "resolution": RESOLUTION,
           "batch_size": BATCH, "bytes_per_sample": per_sample, **prep, "loaders": rows}
    path = Path(__file__).parent / "results" / "loader.json"
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
