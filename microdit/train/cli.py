"""`microdit train` and `microdit eval`: argument parsing over microdit.train.run (`microdit generate`,
alias `sample`, is in microdit/pipeline.py)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def cmd_train(args) -> int:
    from .run import train

    train(args.config, args.overrides, out=args.out, steps=args.steps, data=args.data, val_data=args.val_data,
          resume=args.resume)
    return 0


def cmd_eval(args) -> int:
    if args.protocol:
        return _cmd_eval_protocol(args)
    from .run import evaluate

    if not args.out:
        raise ValueError("microdit eval: --out REPORT.json is required (or --protocol NAME --out DIR)")
    given = {k: v for k, v in (("num", args.num), ("steps", args.steps), ("guidance", args.guidance),
                               ("seed", args.seed)) if v is not None}  # the rest: evaluate's defaults
    evaluate(args.checkpoint, out=args.out, ema=args.ema, device=args.device, details=args.details, **given)
    return 0


def _cmd_eval_protocol(args) -> int:
    """`microdit eval CHECKPOINT --protocol NAME|FILE`: generation over the ranks, metrics and report on rank 0."""
    from ..eval.protocol import load_protocol, run_protocol
    from . import distributed
    from .run import setup_logging

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
    setup_logging(info.is_main)
    try:
        report = run_protocol(args.checkpoint, proto, out, captions_file=args.captions, reference=args.reference,
                              cache_dir=args.cache_dir, info=info)
        if info.is_main:
            print(json.dumps({"report": str(Path(out) / "report.json"), **report["metrics"]}, indent=2))
    finally:
        distributed.teardown()
    return 0


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
