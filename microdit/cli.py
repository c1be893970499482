"""The `microdit` command."""
from __future__ import annotations

import argparse
import json
import sys


def _cmd_info(args) -> int:
    from .info import report

    print(report())
    return 0


def _cmd_flops(args) -> int:
    from .models.flops import model_flops
    from .models.presets import preset_config

    cfg = preset_config(args.preset, input_size=args.latent_size)
    fc = model_flops(cfg, args.mask_ratio, caption_len=args.caption_len)
    out = {"preset": args.preset, "latent_size": args.latent_size, "mask_ratio": args.mask_ratio,
           "forward_gflops_per_image": fc.forward / 1e9, "training_gflops_per_image": fc.training / 1e9,
           "reference_moe_onehot_overhead_gflops": fc.moe_onehot_overhead / 1e9}
    if args.breakdown:
        parts: dict[str, float] = {}
        for k, v in fc.parts.items():
            parts[k] = parts.get(k, 0.0) + v / 1e9
        out["forward_breakdown_gflops"] = parts
    print(json.dumps(out, indent=2))
    return 0


# Modules that add their own subcommands: each has `add_parser(subparsers)` which registers
# one or more parsers with `set_defaults(fn=...)`, `fn(args) -> int` being the exit code.
SUBCOMMAND_MODULES: list[str] = ["microdit.data.prepare", "microdit.train.cli", "microdit.train.demo",
                                  "microdit.pipeline"]


def build_parser() -> argparse.ArgumentParser:
    import importlib

    p = argparse.ArgumentParser(prog="microdit", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    for name in SUBCOMMAND_MODULES:
        importlib.import_module(name).add_parser(sub)
    s = sub.add_parser("info", help="ops, backends and why any cannot run here")
    s.set_defaults(fn=_cmd_info)
    s = sub.add_parser("flops", help="analytic model FLOPs per image")
    s.add_argument("--preset", default="MicroDiT_XL_2")
    s.add_argument("--latent-size", type=int, default=32, help="latent H = W (32 at 256 px, 64 at 512 px)")
    s.add_argument("--mask-ratio", type=float, default=0.75)
    s.add_argument("--caption-len", type=int, default=77)
    s.add_argument("--breakdown", action="store_true")
    s.set_defaults(fn=_cmd_flops)
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # key=value overrides may come anywhere on the line, also after an option.
    stray = [a for a in extra if a.startswith("-") or "=" not in a]
    if stray or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(stray or extra)}")
    if extra:
        args.overrides = list(args.overrides) + extra
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
