"""`microdit bench` and `microdit bench report RESULTS.json`."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from . import cost as cost_mod


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def cmd_bench(args) -> int:
    from . import report, step

    if args.action == "report":
        if not args.results:
            raise SystemExit("microdit bench report: give the RESULTS.json to report on")
        return cmd_report(args)
    if args.action is not None:
        raise SystemExit(f"microdit bench: unknown action {args.action!r} (the only one is `report`)")
    bad = set(args.modes) - set(step.MODES)
    if bad:
        raise SystemExit(f"microdit bench: --modes {sorted(bad)} unknown (choose from {', '.join(step.MODES)})")
    for b in args.backends:
        if step.backends_reasons(b):
            raise SystemExit(f"microdit bench: --backends: " + "; ".join(step.backends_reasons(b)))
    phases = args.phase if args.phase else ([] if args.latent_size and args.mask_ratio is not None else [1])
    spec = step.StepSpec(preset=args.preset, latent_size=args.latent_size, mask_ratio=args.mask_ratio,
                         micro_batch=args.micro_batch, device=args.device, steps=args.steps, warmup=args.warmup,
                         overrides=list(args.overrides))
    if "compiled" in args.modes:
        print("note: torch.compile takes minutes per configuration on a small CPU; --modes eager skips it",
              file=sys.stderr)
    schedule = cost_mod.parse_schedule(args.schedule) if args.schedule else None
    results = report.run(spec, phases, args.backends, args.modes, args.precision or None,
                         check_trainer=args.check_trainer,
                         progress=lambda m: print(f"[{report.stamp()}] {m}", file=sys.stderr, flush=True),
                         out=args.out, schedule=schedule, price=args.price, compiled_phases=args.compiled_phases,
                         note=args.note)
    files = report.write(results, args.out, schedule, args.price)
    print(report.table_markdown(results))
    print(cost_mod.report_markdown(results["cost"], results["meta"]))
    print(json.dumps(files, indent=1))
    return 0


def cmd_report(args) -> int:
    path = Path(args.results)
    if not path.exists():
        raise SystemExit(f"microdit bench report: no results file {path}")
    results = json.loads(path.read_text())
    schedule = cost_mod.parse_schedule(args.schedule) if args.schedule else None
    stem = path.stem + ("" if not args.schedule and args.price == cost_mod.PAPER_PRICE else "-custom")
    cost = cost_mod.write_report(results, Path(args.out or path.parent), stem, schedule, args.price)
    print(cost_mod.report_markdown(cost, results.get("meta")))
    print(json.dumps(cost["files"], indent=1))
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="time real training steps (reference vs fast, eager vs compiled) and "
                                     "cost the paper's schedule; `bench report RESULTS.json` re-costs a results file")
    p.add_argument("action", nargs="?", help="`report`: the cost report of an existing RESULTS.json")
    p.add_argument("results", nargs="?", help="with `report`: the results JSON")
    p.add_argument("--preset", default="MicroDiT_Micro_2")
    p.add_argument("--phase", type=int, nargs="+", choices=[1, 2, 3, 4],
                   help="the paper's phases to measure (default 1; 256 px/512 px, masked 75%%/unmasked)")
    p.add_argument("--latent-size", type=int, help="latent grid side instead of the phase's")
    p.add_argument("--mask-ratio", type=float, help="mask ratio instead of the phase's")
    p.add_argument("--micro-batch", type=int, help="per-device batch (default: the phase config's; on the CPU / 32)")
    p.add_argument("--device", default="auto")
    p.add_argument("--steps", type=int, help="measured steps (default 20 on a GPU, 5 on the CPU)")
    p.add_argument("--warmup", type=int, help="untimed steps first (default 5 on a GPU, 2 on the CPU)")
    p.add_argument("--backends", type=_csv, default=["reference", "fast"], help="reference,fast, or OP=BACKEND[+OP=BACKEND] configurations (attention=flash_attn)")
    p.add_argument("--modes", type=_csv, default=["eager", "compiled"], help="eager,compiled")
    p.add_argument("--compiled-phases", type=int, nargs="+", choices=[1, 2, 3, 4],
                   help="run the compiled configurations only in these phases (the others are listed as skipped)")
    p.add_argument("--precision", action="append", help="fp32, bf16, fp8 (repeat; default bf16+fp8 on a GPU, "
                                                         "fp32 on the CPU)")
    p.add_argument("--check-trainer", action="store_true",
                   help="also run Trainer.run on the first setting and compare its logged images/s")
    p.add_argument("--price", type=float, default=cost_mod.PAPER_PRICE, help="$ per GPU-hour (default 3.75)")
    p.add_argument("--schedule", action="append",
                   help="PHASE:STEPSxBATCH or a training-config .yaml (repeat); default the paper's schedule")
    p.add_argument("--note", help="a sentence on how the run was made (pinning, machine load), kept in the results")
    p.add_argument("--out", default="benches/results", help="where the JSON, markdown and PNG go")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="training-config overrides")
    p.set_defaults(fn=cmd_bench)
