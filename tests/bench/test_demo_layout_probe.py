"""benches/demo_layout_probe.py runs on prepared-shard files and reports what it promises."""
import json

import pytest
import safetensors.torch as st
import torch

from benches import demo_layout_probe


def _shards(root, n=4, items=140):
    g = torch.Generator().manual_seed(0)
    for i in range(n):
        st.save_file({"latents_16": torch.randn(items, 12, 8, 8, generator=g),
                      "caption_states": torch.randn(items, 6, 384, generator=g)},
                     str(root / f"shard-{i:05d}.safetensors"))


def test_probe_reports_held_out_and_train_errors(tmp_path):
    _shards(tmp_path)
    out = tmp_path / "probe.jsonl"
    assert demo_layout_probe.main([str(tmp_path), "--steps", "2", "--batch", "4", "--init-std", "0.1",
                                   "--jsonl", str(out)]) == 0
    row = json.loads(out.read_text())
    assert row["init_std"] == 0.1 and row["steps"] == 2
    for split in ("heldout", "train"):
        for s in demo_layout_probe.SIGMAS:
            v = row[f"{split}_rel_mse_sigma{s:g}"]
            assert 0 < v < 10  # unit-variance random latents: an untrained denoiser is near 1


def test_probe_refuses_too_few_shards(tmp_path):
    _shards(tmp_path, n=2)
    with pytest.raises(SystemExit, match="needs at least 4 prepared shards"):
        demo_layout_probe.main([str(tmp_path), "--steps", "1"])
