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
                                  "microdit.pipeline", "microdit.bench.cli"]


def build_parser() -> argparse.ArgumentParser:
    import importlib

    p = argparse.ArgumentParser(prog="microdit", description=__doc__,
                                epilog="--debug (anywhere on the line) shows the traceback of an error")
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


def _expected_errors() -> dict:
    """Exception types a user can cause and act on -> the hint printed after their message."""
    from .data.prepare import PrepareError
    from .data.shards import ShardError
    from .models.checkpoint import CheckpointError
    from .ops.registry import BackendError
    from .train.checkpoint import TrainCheckpointError
    from .train.config import ConfigError
    from .train.runlock import RunLockError
    from .train.trainer import NonFiniteLossError

    from .pipeline import EncoderMismatchError

    return {
        EncoderMismatchError: "pass the encoders the model was trained with",
        # a missing optional dependency: the message holds the pip line that installs it
        ImportError: "",
        TrainCheckpointError: "pass another checkpoint (a .pt file or a training --out directory)",
        CheckpointError: "pass a checkpoint in the published MicroDiT format",
        ShardError: "re-create the dataset with `microdit prepare`",
        PrepareError: "see `microdit prepare --help`",
        ConfigError: "see `microdit train --help` and the dataclasses in microdit/train/config.py",
        RunLockError: "wait for that run, or choose another --out",
        NonFiniteLossError: "lower optim.lr or check the data; resume from the last checkpoint with --resume",
        BackendError: "`microdit info` lists every backend and why it cannot run",
        OSError: "check the path, its permissions and the free space",
    }


def _own_error(e: BaseException) -> bool:
    """A ValueError or TypeError raised by microdit itself: a deliberate message about bad input."""
    import traceback
    from pathlib import Path

    frames = traceback.extract_tb(e.__traceback__)
    return bool(frames) and Path(frames[-1].filename).resolve().is_relative_to(Path(__file__).resolve().parent)


def _message(e: BaseException, hint: str | None) -> str:
    import errno

    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
        where = f" writing {e.filename}" if e.filename else ""
        return f"no space left on device{where}; free space or write to another --out (the last checkpoint is intact)"
    msg = str(e) or type(e).__name__
    if isinstance(e, OSError) and e.strerror:
        msg = f"{e.strerror}: {e.filename}" if e.filename else e.strerror
    if hint and hint not in msg and "`microdit" not in msg:
        msg = f"{msg}; {hint}"
    return msg


def main(argv=None) -> int:
    """Run the command; expected errors print `microdit: error: ...` (the traceback with --debug)."""
    import os

    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("MICRODIT_DEBUG", "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # key=value overrides may come anywhere on the line, also after an option.
    stray = [a for a in extra if a.startswith("-") or "=" not in a]
    if stray or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(stray or extra)}")
    if extra:
        args.overrides = list(args.overrides) + extra
    try:
        return args.fn(args)
    except Exception as e:
        hints = _expected_errors()
        kind = next((t for t in hints if isinstance(e, t)), None)
        if debug or (kind is None and not (isinstance(e, (ValueError, TypeError)) and _own_error(e))):
            raise
        print(f"microdit: error: {_message(e, hints.get(kind))} (--debug shows the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
