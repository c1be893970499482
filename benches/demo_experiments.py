"""Controlled demo experiments: train a recipe variant for a few hundred steps, score it with ShapesEval.

Each experiment is the demo config plus `key=value` overrides (the trainer's config keys), trained
on shards prepared once and shared by every run, then sampled with the EMA weights and scored on
`--prompts` ShapesEval prompts. Sampler settings are experiment settings too: `sample.sigma_max=`,
`sample.rho=`, `sample.steps=`, `sample.guidance=`, `sample.churn=` (EDM's stochastic sampler).
One JSON line per experiment is appended to
`--results`; `--table` prints them as the markdown table of docs/demo_experiments.md.

    python -m benches.demo_experiments --name base --steps 400
    python -m benches.demo_experiments --name lr3e-3 --steps 400 optim.lr=3e-3
    python -m benches.demo_experiments --table
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

CATEGORIES = ("single_object", "two_objects", "counting", "colors", "position", "color_attribution", "overall")


def _split(overrides: list[str]) -> tuple[list[str], dict]:
    """Trainer overrides and sampler settings (`sample.*`) apart."""
    train, sample = [], {}
    for o in overrides:
        key, _, value = o.partition("=")
        if key.startswith("sample."):
            sample[key.removeprefix("sample.")] = float(value)
        else:
            train.append(o)
    return train, sample


def run(name: str, steps: int, overrides: list[str], work: Path, prompts: int, config: str) -> dict:
    import numpy as np

    from microdit.data.loader import ShardLoader
    from microdit.models.microdit import MicroDiT
    from microdit.train.run import data_info_from, prepare_default_data
    from microdit.train.config import load_config
    from microdit.train.distributed import setup
    from microdit.train.trainer import Trainer

    train_over, sample = _split(overrides)
    out = work / name
    cfg = load_config(config, [*train_over, f"train.steps={steps}", f"out={out}", "train.sample_every=0",
                               "train.ckpt_every=0", "train.tensorboard=false"])
    info = setup("cpu")
    # Shards are shared by the runs that prepare the same data.
    d = cfg.data
    data_key = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in
                       f"{d.source}-{d.num}-{d.resolution}-{d.codec}-{d.text_encoder}-{d.caption_len}")
    data_cfg = load_config(config, [*train_over, f"out={work / ('data-' + data_key)}"])
    t0 = time.perf_counter()
    root = Path(cfg.data.path) if cfg.data.path else prepare_default_data(data_cfg, info)
    t_prep = time.perf_counter() - t0
    loader = ShardLoader(root, cfg.train.micro_batch, seed=cfg.train.seed, resolution=cfg.data.resolution,
                         caption_dropout=cfg.data.caption_dropout)
    trainer = Trainer(cfg, loader, data_info_from(loader.dataset), dist_info=info)
    trainer.sample_grid = lambda: None  # scored below instead
    t1 = time.perf_counter()
    summary = trainer.run()
    t_train = time.perf_counter() - t1

    model = MicroDiT(trainer.raw.config)
    model.load_state_dict(trainer.ema.shadow if trainer.ema else trainer.raw.state_dict())
    t2 = time.perf_counter()
    scores = score(model, trainer.data_info, cfg.diffusion.sigma_data, sample, cfg.train, prompts, out)
    t_eval = time.perf_counter() - t2
    curve = summary["loss_curve"]
    result = {"name": name, "steps": steps, "overrides": overrides, "prompts": prompts,
              "prepare_s": round(t_prep, 1), "train_s": round(t_train, 1), "eval_s": round(t_eval, 1),
              "load": os.getloadavg()[0], "parameters": summary["parameters"],
              "final_loss": float(np.mean([v for _, v in curve[-4:]])),
              **{k: round(float(scores[k]), 3) for k in CATEGORIES}}
    return result


def score(model, data_info: dict, sigma_data: float, sample: dict, train, prompts: int, out: Path) -> dict:
    """ShapesEval of `model` (EMA weights) on `prompts` prompts; the first 48 images to out/eval_grid.png."""
    import numpy as np
    import torch

    from microdit.diffusion import edm
    from microdit.eval.shapes_eval import ShapesEval, eval_prompts
    from microdit.train.sampling import encoders_from, save_grid

    model.eval()
    ecfg = edm.EDMConfig(sigma_data=sigma_data, sigma_max=sample.get("sigma_max", edm.DEFAULT.sigma_max),
                         sigma_min=sample.get("sigma_min", edm.DEFAULT.sigma_min),
                         rho=sample.get("rho", edm.DEFAULT.rho))
    n_steps = int(sample.get("steps", train.sample_steps))
    guidance = sample.get("guidance", train.sample_guidance)
    text_encoder, codec = encoders_from(data_info, "cpu")
    evals = eval_prompts(prompts, 0)
    images = []
    c = model.config
    with torch.no_grad():
        for s in range(0, len(evals), 30):
            chunk = [e.prompt for e in evals[s:s + 30]]
            states, _ = text_encoder.encode(chunk)
            noise = torch.randn(len(chunk), c.in_channels, c.input_size, c.input_size,
                                generator=torch.Generator().manual_seed(s))
            z = edm.sample(model, noise, states, steps=n_steps, guidance=guidance, config=ecfg,
                           churn=sample.get("churn", 0.0), generator=torch.Generator().manual_seed(10_000 + s))
            images.append(codec.decode(z).numpy())
    images = np.concatenate(images)
    save_grid(images[:48], Path(out) / "eval_grid.png", nrow=12)
    return ShapesEval().score(images, [e.prompt for e in evals])


def rescore(name: str, checkpoint: str, overrides: list[str], prompts: int) -> dict:
    """Score a finished training checkpoint again (sampler settings from `overrides`)."""
    import torch

    from microdit.models.config import MicroDiTConfig
    from microdit.models.microdit import MicroDiT
    from microdit.train.config import TrainSection

    _, sample = _split(overrides)
    # Our own experiment checkpoints (also those written before weights-only checkpoints).
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    model = MicroDiT(MicroDiTConfig.from_dict(state["model_config"]))
    model.load_state_dict(state["ema"]["shadow"] if state.get("ema") else state["model"])  # raw where no EMA
    data_info = state["data_info"]
    t = time.perf_counter()
    scores = score(model, data_info, 0.9, sample, TrainSection(sample_steps=20, sample_guidance=3.0), prompts,
                   Path(checkpoint).parent / f"rescore-{name}")
    return {"name": name, "steps": None, "overrides": overrides, "prompts": prompts, "checkpoint": checkpoint,
            "eval_s": round(time.perf_counter() - t, 1), "load": os.getloadavg()[0],
            **{k: round(float(scores[k]), 3) for k in CATEGORIES}}


def load_run_checkpoint(checkpoint: str, num: int, weights: str = "ema"):
    """(model in eval mode, checkpoint state, `num` samples of the run's own data, used_ema) for
    the probes: EMA weights when asked for and the run kept them, else the raw ones."""
    import torch

    from microdit.data.loader import ShardLoader
    from microdit.models.config import MicroDiTConfig
    from microdit.models.microdit import MicroDiT

    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    model = MicroDiT(MicroDiTConfig.from_dict(state["model_config"]))
    use_ema = bool(weights == "ema" and state.get("ema"))  # raw weights where the run had no EMA
    model.load_state_dict(state["ema"]["shadow"] if use_ema else state["model"])
    model.eval()
    batch = next(ShardLoader(state["data_info"]["path"], num, seed=1, resolution=state["data_info"]["resolution"]))
    return model, state, batch, use_ema


def probe(checkpoint: str, sigmas=(0.3, 1, 2, 5, 10, 40), num: int = 128, weights: str = "ema") -> dict:
    """How much of the image the denoiser explains at each noise level, with and without its caption.

    On `num` training samples of the run's own data: the denoiser's MSE divided by that of
    predicting the batch's mean image ("rel mse": 1 = knows nothing beyond the mean). At high
    noise only the caption can tell where the objects are, so a rel mse near 1 there with the
    right caption means the model has not learned the caption's layout (docs/demo_experiments.md).
    """
    import torch

    from microdit.diffusion import edm

    model, state, batch, _ = load_run_checkpoint(checkpoint, num, weights)
    x0, y = batch["latents"], batch["caption_states"]
    base = ((x0.mean(0, keepdim=True) - x0) ** 2).mean()
    sigma_data = state.get("config", {}).get("diffusion", {}).get("sigma_data", 0.9)
    g = torch.Generator().manual_seed(0)
    out = {}
    for s in sigmas:
        noisy = x0 + torch.randn(x0.shape, generator=g) * s
        with torch.no_grad():
            rel = [float(((edm.denoise(model, noisy, torch.tensor(float(s)), yy, sigma_data=sigma_data) - x0) ** 2)
                         .mean() / base) for yy in (y, torch.zeros_like(y))]
        out[str(s)] = {"caption": round(rel[0], 3), "no_caption": round(rel[1], 3)}
    return out


def table(results: Path) -> str:
    rows = [json.loads(line) for line in results.read_text().splitlines() if line.strip()]
    head = ["experiment", "change", "steps", "train min", "load", "loss", *CATEGORIES]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        change = " ".join(f"`{o}`" for o in r["overrides"]) or "demo config"
        trained = "train_s" in r  # rescored checkpoints: the training row they come from says
        lines.append("| " + " | ".join([r["name"], change, str(r["steps"] or "as trained"),
                                        f"{r['train_s'] / 60:.1f}" if trained else "-", f"{r['load']:.1f}",
                                        f"{r['final_loss']:.3f}" if trained else "-",
                                        *[f"{r[k]:.2f}" for k in CATEGORIES]]) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--name")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--prompts", type=int, default=60)
    p.add_argument("--config", default="demo")
    p.add_argument("--work", default="runs/demo_experiments")
    p.add_argument("--results", default="runs/demo_experiments/results.jsonl")
    p.add_argument("--table", action="store_true", help="print the results as a markdown table")
    p.add_argument("--checkpoint", help="score this training checkpoint instead of training (sampler experiments)")
    p.add_argument("--probe", metavar="CHECKPOINT",
                   help="print the denoiser's error per noise level, with and without captions (rel mse)")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    args = p.parse_args(argv)
    results = Path(args.results)
    if args.table:
        print(table(results))
        return 0
    if args.probe:
        print(json.dumps(probe(args.probe)))
        return 0
    if not args.name:
        p.error("--name is required (or --table)")
    if args.checkpoint:
        r = rescore(args.name, args.checkpoint, args.overrides, args.prompts)
    else:
        r = run(args.name, args.steps, args.overrides, Path(args.work), args.prompts, args.config)
    results.parent.mkdir(parents=True, exist_ok=True)
    with results.open("a") as f:
        f.write(json.dumps(r) + "\n")
    print(json.dumps(r))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
