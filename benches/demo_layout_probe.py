"""How fast does a MicroDiT learn the caption -> layout map? (issue 14, fifth round)

Trains a fresh model of the demo's shape on prepared shards (the first three shards for
training, 128 items of the fourth held out) with the library's EDM loss, then reports the
denoiser's error relative to predicting the mean image, `rel mse`, on held-out and training
items at sigma 80, 20, 5 and 1. At sigma 80 the input is almost pure noise, so the error there
says how much of each image the model can tell from its caption alone (0 for a caption that
fixes its image, as `shapes:...,jitter=0` does).

    microdit prepare shapes:textured=0,backgrounds=grey,jitter=0 /tmp/shards --num 4000 \
        --resolution 32 --codec pixels:2:5 --text-encoder minilm --caption-len 32
    python -m benches.demo_layout_probe /tmp/shards --steps 600 --P-mean 4.38 --P-std 0 --mask 0 --init-std 0.1

One core, 600 steps of 32 take 2.5 to 3.5 minutes. Results: docs/demo_experiments.md, fifth round.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import safetensors.torch as st
import torch

import microdit
from benches.demo_testbed import train_edm
from microdit.diffusion import edm

SIGMAS = (80.0, 20.0, 5.0, 1.0)


def load_shards(root: Path) -> tuple[torch.Tensor, torch.Tensor]:
    shards = sorted(root.glob("shard-*.safetensors"))
    if len(shards) < 4:
        raise SystemExit(f"{root}: needs at least 4 prepared shards (3 to train on, 1 held out), found {len(shards)}")
    xs, ys = [], []
    for path in shards[:4]:
        d = st.load_file(str(path))
        key = next((k for k in d if k.startswith("latents_")), None)
        if key is None or "caption_states" not in d:
            raise SystemExit(f"{path}: not a microdit prepare shard (no latents_* / caption_states)")
        xs.append(d[key].float())
        ys.append(d["caption_states"].float())
    return xs, ys


def run(root: Path, steps: int, batch: int, lr: float, mask: float, P_mean: float, P_std: float,
        init_std: float, seed: int) -> dict:
    torch.manual_seed(seed)
    xs, ys = load_shards(root)
    x, y = torch.cat(xs[:3]), torch.cat(ys[:3])
    xv, yv = xs[3][:128], ys[3][:128]
    model = microdit.create_model("MicroDiT_Micro_2", in_channels=x.shape[1], input_size=x.shape[2],
                                  caption_channels=y.shape[-1], init_std=init_std)
    config = edm.EDMConfig(P_mean=P_mean, P_std=P_std)
    g = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()

    def draw(gen):
        idx = torch.randint(0, len(x), (batch,), generator=gen)
        return x[idx], y[idx]

    train_edm(model, draw, steps, lr=lr, mask_ratio=mask, config=config, generator=g,
              patch=model.config.patch_size, ops=model.ops)
    train_s = time.perf_counter() - t0
    model.eval()
    base = ((xv - x.mean(0, keepdim=True)) ** 2).mean().item()
    out = {"steps": steps, "batch": batch, "lr": lr, "mask_ratio": mask, "P_mean": P_mean, "P_std": P_std,
           "init_std": init_std, "seed": seed, "train_s": round(train_s, 1)}
    with torch.no_grad():
        for name, (xe, ye) in {"heldout": (xv, yv), "train": (x[:128], y[:128])}.items():
            for sigma in SIGMAS:
                s = torch.full((len(xe), 1, 1, 1), sigma)
                d = edm.denoise(model, xe + torch.randn(xe.shape, generator=g) * sigma, s, ye)
                out[f"{name}_rel_mse_sigma{sigma:g}"] = round(((d - xe) ** 2).mean().item() / base, 3)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("shards", type=Path)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--mask", type=float, default=0.5)
    p.add_argument("--P-mean", type=float, default=1.0)
    p.add_argument("--P-std", type=float, default=1.6)
    p.add_argument("--init-std", type=float, default=0.02)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--jsonl", type=Path, help="append the result as one JSON line")
    a = p.parse_args(argv)
    result = run(a.shards, a.steps, a.batch, a.lr, a.mask, a.P_mean, a.P_std, a.init_std, a.seed)
    print(json.dumps(result))
    if a.jsonl:
        with open(a.jsonl, "a") as f:
            f.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
