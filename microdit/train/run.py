"""The library under `microdit train` and `microdit eval`: call these from Python (the demo does).

    from microdit.train.run import train, evaluate
    summary = train("demo", ["train.steps=30"], out="runs/x")   # the summary.json dict
    report = evaluate("runs/x", num=120, ema=True)              # the ShapesEval report

Both work under torchrun (every rank calls them; rank 0 prints and writes). `prepare_default_data`
prepares a config's source on first use; `data_info_from` is what a model and sampler need to know
of prepared data (it is stored in every checkpoint).
"""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

log = logging.getLogger("microdit.train")


def setup_logging(main: bool) -> None:
    """INFO to stderr on the main rank, warnings only elsewhere."""
    logging.basicConfig(level=logging.INFO if main else logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")


def data_info_from(dataset) -> dict:
    """What the model and the sampler need to know of prepared data."""
    item = dataset[0]
    C, h, _ = item["latents"].shape
    L, Cy = item["caption_states"].shape
    return {"channels": int(C), "latent_size": int(h), "caption_dim": int(Cy), "caption_len": int(L),
            "resolution": dataset.resolution, "codec": dataset.metadata["codec"],
            "text_encoder": dataset.metadata["text_encoder"], "path": str(dataset.root)}


def prepare_default_data(cfg, info) -> Path:
    """The config's source prepared into OUT/data on first use (rank 0 writes; others wait)."""
    from ..data.text_encoders import get_text_encoder
    from ..data.prepare import prepare
    from . import distributed

    root = Path(cfg.out) / "data"
    if info.is_main:
        d = cfg.data
        summary = prepare(d.source, root, resolutions=(d.resolution,), codec=d.codec,
                          text_encoder=get_text_encoder(d.text_encoder, max_length=d.caption_len),
                          num=d.num, seed=cfg.train.seed)
        log.info("data ready in %s: %d samples (%d skipped)", root, summary["written"] + summary.get("existing", 0),
                 summary["skipped"])
    distributed.barrier(info)
    return root


def train(config="demo", overrides=(), *, out=None, steps: int | None = None, data=None, val_data=None,
          resume: bool = False) -> dict:
    """Train from a shipped config name or YAML path with key=value `overrides`; `out`, `steps`,
    `data` (prepared shards; default: the config's, prepared into OUT/data) and `val_data`
    (held-out shards for validation) override the config too. Returns the run's summary (also
    written to OUT/summary.json)."""
    from ..data.loader import ShardLoader, open_dataset
    from . import distributed
    from .config import load_config
    from .trainer import Trainer
    from .validation import build_validator, held_out_count

    overrides = list(overrides)
    if out:
        overrides.append(f"out={out}")
    if steps is not None:
        overrides.append(f"train.steps={steps}")
    if data:
        overrides.append(f"data.path={data}")
    if val_data:
        overrides.append(f"val.data={val_data}")
    cfg = load_config(config, overrides)
    info = distributed.setup(cfg.train.device)
    setup_logging(info.is_main)
    try:
        root = Path(cfg.data.path) if cfg.data.path else prepare_default_data(cfg, info)
        dataset = open_dataset(root, cfg.data.resolution)
        held = 0 if cfg.val.data else held_out_count(len(dataset), cfg.data.val_fraction)
        loader = ShardLoader(dataset, cfg.train.micro_batch, rank=info.rank, world_size=info.world_size,
                             seed=cfg.train.seed, caption_dropout=cfg.data.caption_dropout,
                             num_workers=cfg.data.num_workers, pin_memory=info.device.type == "cuda",
                             verify="background" if cfg.data.verify_checksums else "off",
                             num_samples=len(dataset) - held)
        validator = build_validator(cfg, dataset, open_dataset(cfg.val.data, cfg.data.resolution)
                                    if cfg.val.data else None)
        trainer = Trainer(cfg, loader, data_info_from(loader.dataset), dist_info=info, resume=resume,
                          validator=validator)
        summary = trainer.run()
        if info.is_main:
            print(json.dumps({k: v for k, v in summary.items() if k != "loss_curve"}, indent=2))
    finally:
        distributed.teardown()
    return summary


def evaluate(checkpoint, *, out=None, num: int = 120, steps: int = 30, guidance: float = 5.0, seed: int = 0,
             ema: bool = False, device="auto", details: bool = False) -> dict | None:
    """ShapesEval of a run trained on shapes (a checkpoint file or a run directory, its latest):
    `num` prompts, one image each, float32 as the scores were measured. The report (written to
    `out` as JSON when given) on the main rank, None on the others."""
    from ..eval.shapes_eval import ShapesEval, eval_prompts
    from ..pipeline import MicroDiTPipeline
    from . import distributed
    from .sampling import generate_distributed

    info = distributed.setup(device)
    setup_logging(info.is_main)
    report = None
    try:
        pipe = MicroDiTPipeline.from_run(checkpoint, ema=ema, device=info.device, dtype="float32")
        prompts = [p.prompt for p in eval_prompts(num, seed)]
        images = generate_distributed(pipe, prompts, info, num_per_prompt=1, steps=steps, guidance=guidance,
                                      seed=seed)
        if info.is_main:
            scores = ShapesEval().score(images, prompts)
            report = {"checkpoint": str(checkpoint), "ema": ema, "num_prompts": len(prompts),
                      "steps": steps, "guidance": guidance, "seed": seed,
                      **{k: v for k, v in scores.items() if k != "details"}}
            if details:
                report["details"] = scores.get("details")
            if out is not None:
                Path(out).parent.mkdir(parents=True, exist_ok=True)
                Path(out).write_text(json.dumps(report, indent=2))
            print(json.dumps({k: v for k, v in report.items() if k != "details"}, indent=2))
    finally:
        distributed.teardown()
    return report
