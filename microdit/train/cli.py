"""`microdit train` and `microdit eval` (`microdit generate`, alias `sample`, is in microdit/pipeline.py)."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch

log = logging.getLogger("microdit.train")


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
    from ..data.encoders import get_text_encoder
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


def cmd_train(args) -> int:
    from ..data.loader import ShardLoader, open_dataset
    from . import distributed
    from .config import load_config
    from .trainer import Trainer
    from .validation import build_validator, held_out_count

    overrides = list(args.overrides)
    if args.out:
        overrides.append(f"out={args.out}")
    if args.steps is not None:
        overrides.append(f"train.steps={args.steps}")
    if args.data:
        overrides.append(f"data.path={args.data}")
    if args.val_data:
        overrides.append(f"val.data={args.val_data}")
    cfg = load_config(args.config, overrides)
    info = distributed.setup(cfg.train.device)
    _logging(info.is_main)
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
        trainer = Trainer(cfg, loader, data_info_from(loader.dataset), dist_info=info, resume=args.resume,
                          validator=validator)
        summary = trainer.run()
        if info.is_main:
            print(json.dumps({k: v for k, v in summary.items() if k != "loss_curve"}, indent=2))
    finally:
        distributed.teardown()
    return 0


def load_for_sampling(checkpoint, use_ema: bool, device):
    """(model, data_info) from a training checkpoint file or output directory."""
    from ..models.config import MicroDiTConfig
    from ..models.microdit import MicroDiT
    from .checkpoint import TrainCheckpointError, load_checkpoint, resolve_checkpoint

    path = resolve_checkpoint(checkpoint)
    state = load_checkpoint(path)
    if use_ema and not state.get("ema"):
        raise TrainCheckpointError(f"{path}: --ema asked for, but this run kept no EMA (ema.enabled was false); "
                                   "sample without --ema")
    weights = state["ema"]["shadow"] if use_ema else state["model"]
    model = MicroDiT(MicroDiTConfig.from_dict(state["model_config"]))
    model.load_state_dict(weights)
    log.info("loaded %s (step %d%s)", path, state["step"], ", EMA weights" if use_ema else "")
    return model.to(device).eval(), state["data_info"]


def _split_generate(pipe, prompts, info, **kw):
    """Each rank makes its share of (prompt, k) jobs with `pipe`; rank 0 gets all images in order."""
    import numpy as np

    from . import distributed

    k = kw.pop("num_per_prompt")
    jobs = [(i, j) for i in range(len(prompts)) for j in range(k)]
    mine = jobs[info.rank::info.world_size]
    # Every image is a function of (seed, prompt, k) alone, so the split does not change it.
    made = pipe.images(prompts, jobs=mine, **kw) if mine else []
    images = {job: made[n:n + 1] for n, job in enumerate(mine)}
    if info.enabled:
        gathered = [None] * info.world_size
        torch.distributed.all_gather_object(gathered, images)
        for part in gathered:
            images.update(part)
    distributed.barrier(info)
    return np.concatenate([images[job] for job in jobs]) if info.is_main else None


def cmd_eval(args) -> int:
    if args.protocol:
        return _cmd_eval_protocol(args)
    from ..eval.shapes_eval import ShapesEval, eval_prompts
    from ..pipeline import MicroDiTPipeline
    from . import distributed

    if not args.out:
        raise ValueError("microdit eval: --out REPORT.json is required (or --protocol NAME --out DIR)")
    steps, guidance, seed = (30 if args.steps is None else args.steps, 5.0 if args.guidance is None else args.guidance,
                             0 if args.seed is None else args.seed)
    info = distributed.setup(args.device)
    _logging(info.is_main)
    try:
        # float32, as the scores were measured; the same sampling path as `microdit generate`.
        pipe = MicroDiTPipeline.from_run(args.checkpoint, ema=args.ema, device=info.device, dtype="float32")
        prompts = [p.prompt for p in eval_prompts(120 if args.num is None else args.num, seed)]
        images = _split_generate(pipe, prompts, info, num_per_prompt=1, steps=steps,
                                 guidance=guidance, seed=seed)
        if info.is_main:
            scores = ShapesEval().score(images, prompts)
            report = {"checkpoint": str(args.checkpoint), "ema": args.ema, "num_prompts": len(prompts),
                      "steps": steps, "guidance": guidance, "seed": seed,
                      **{k: v for k, v in scores.items() if k != "details"}}
            if args.details:
                report["details"] = scores.get("details")
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(report, indent=2))
            print(json.dumps({k: v for k, v in report.items() if k != "details"}, indent=2))
    finally:
        distributed.teardown()
    return 0


def _cmd_eval_protocol(args) -> int:
    """`microdit eval CHECKPOINT --protocol NAME|FILE`: generation over the ranks, metrics and report on rank 0."""
    from ..eval.protocol import load_protocol, run_protocol
    from . import distributed

    over: dict = {}
    for key, value in (("steps", args.steps), ("guidance", args.guidance), ("seed", args.seed),
                       ("batch_size", args.batch_size)):
        if value is not None:
            over.setdefault("sampler", {})[key] = value
    if args.ema:
        over.setdefault("sampler", {})["ema"] = True
    if args.num is not None:
        over["captions"] = {"count": args.num}
    for key, value in (("inception", args.inception), ("clip_model", args.clip_model)):
        if value is not None:
            over.setdefault("metrics", {})[key] = value
    proto = load_protocol(args.protocol, over)
    out = args.out or f"runs/eval-{proto['name']}"
    info = distributed.setup(args.device)
    _logging(info.is_main)
    try:
        report = run_protocol(args.checkpoint, proto, out, captions_file=args.captions, reference=args.reference,
                              cache_dir=args.cache_dir, info=info)
        if info.is_main:
            print(json.dumps({"report": str(Path(out) / "report.json"), **report["metrics"]}, indent=2))
    finally:
        distributed.teardown()
    return 0


def _logging(main: bool) -> None:
    logging.basicConfig(level=logging.INFO if main else logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1 (0 images per prompt or 0 sampling steps is a usage error)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return value


def add_parser(sub) -> None:
    p = sub.add_parser("train", help="train a MicroDiT (works under torchrun)")
    p.add_argument("--config", default="demo", help="a shipped config (demo, phase1..phase4) or a YAML path")
    p.add_argument("--data", help="shards made by `microdit prepare` (default: the config's data)")
    p.add_argument("--out", help="output directory (checkpoints, logs, samples)")
    p.add_argument("--steps", type=int)
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    p.add_argument("--val-data", help="held-out shards for validation (val.every > 0; else data.val_fraction)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. optim.lr=1e-4")
    p.set_defaults(fn=cmd_train)

    p = sub.add_parser("eval", help="ShapesEval of a model trained on shapes, or a pinned protocol (FID, KID, CLIP score)")
    p.add_argument("checkpoint", help="a checkpoint file or a training output directory (its latest)")
    p.add_argument("--out", help="without --protocol: the JSON report to write; with it: the output folder "
                                 "(images, manifests, report.json, report.md)")
    p.add_argument("--num", type=positive_int, help="evaluation prompts (120 without --protocol; else the first N captions)")
    p.add_argument("--details", action="store_true", help="include per-prompt details")
    p.add_argument("--protocol", help="coco30k, shapes, or a protocol YAML/JSON file")
    p.add_argument("--captions", help="the protocol's captions file (.jsonl/.json/COCO annotations/.csv/.txt)")
    p.add_argument("--reference", help="reference images: a folder, prepared shards, or a statistics .npz")
    p.add_argument("--inception", help="torch-fidelity's Inception weights file (default: torch hub cache)")
    p.add_argument("--clip-model", help="CLIP model for the CLIP score: a local folder or hub id")
    p.add_argument("--cache-dir", help="where reference statistics are cached (default: OUT/cache)")
    p.add_argument("--batch-size", type=positive_int, help="images per sampling batch")
    add_sampling_args(p)
    # None: the protocol's values (with --protocol), else 30 steps, guidance 5, seed 0.
    p.set_defaults(steps=None, guidance=None, seed=None)
    p.add_argument("--ema", action="store_true", help="use the EMA weights")
    p.set_defaults(fn=cmd_eval)


def add_sampling_args(p) -> None:
    """--steps, --guidance, --seed, --device: shared by `generate` (alias `sample`) and `eval`."""
    p.add_argument("--steps", type=positive_int, default=30)
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
