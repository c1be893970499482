"""Several phases measured into one results dict; its tables; the files under --out."""
from __future__ import annotations

import dataclasses
import json
import re
import time
from pathlib import Path

from . import cost as cost_mod
from .profile import CATEGORIES
from . import timing
from .step import (BACKENDS, MODES, StepSpec, add_ratios, default_precisions, measure_peaks, run_matrix,
                   trainer_check)


def headline(rows: list[dict], precision: str) -> dict:
    """{"fast": ..., "reference": ...} of one phase at `precision`: reference is the published
    computation in eager mode; fast is the quickest configuration of the fast backends."""
    ok = [r for r in rows if r["status"] == "ok" and r["precision"] == precision]
    out = {}
    ref = [r for r in ok if r["backends"] == "reference" and r["mode"] == "eager"]
    fast = sorted((r for r in ok if r["backends"] == "fast"), key=lambda r: -r["images_per_s"])
    for kind, pick in (("reference", ref[:1]), ("fast", fast[:1])):
        if pick:
            r = pick[0]
            out[kind] = {"images_per_s": r["images_per_s"], "mfu": r["mfu"], "mfu_datasheet": r["mfu_datasheet"],
                         "peak_mem_gib": r["peak_mem_gib"], "step_ms_median": r["step_ms_median"],
                         "config": f"{r['backends']}/{r['mode']}/{r['precision']}"}
    return out


def run(spec: StepSpec, phases=(1,), backends=BACKENDS, modes=MODES, precisions=None, check_trainer=False,
        progress=None, out=None, schedule=None, price: float = cost_mod.PAPER_PRICE, compiled_phases=None,
        note: str | None = None) -> dict:
    """`run_matrix` for each phase (or once for a custom latent size / mask ratio), into one
    results dict. Eager configurations of every phase come first, compiled ones after (only in
    `compiled_phases` when given); with `out`, the files are rewritten after each phase, so a
    run stopped by a timeout leaves what it measured."""
    import torch

    specs = [dataclasses.replace(spec, phase=p).resolved() for p in (phases or [None])]
    device = torch.device(specs[0].device)
    prec = (precisions or default_precisions(device))[0]
    results = {"device": timing.device_name(device), "commit": timing.git_commit(), "torch": torch.__version__,
               "preset": spec.preset, "meta": timing.metadata(device), "peaks": measure_peaks(device),
               "phases": {}, "runs": {},
               "note": "CPU timings on a shared machine are noisy (see meta.load); step times are wall "
                       "clock around a synchronised trainer step." + (f" {note}" if note else "")}
    for mode in modes:
        for s in specs:
            key = str(s.phase) if s.phase is not None else f"custom-{s.latent_size}-{s.mask_ratio}"
            run_ = results["runs"].setdefault(key, {"spec": dict(s.__dict__), "configs": []})
            if mode == "compiled" and compiled_phases and s.phase not in compiled_phases:
                run_["configs"] += [{"phase": s.phase, "backends": b, "mode": mode, "precision": p,
                                     "status": "skipped", "reason": "compiled runs only in phases "
                                     f"{sorted(compiled_phases)} here (the time limit of this run)"}
                                    for b in backends for p in (precisions or default_precisions(device))]
                continue
            run_["configs"] += run_matrix(s, backends, [mode], precisions, progress, results["peaks"])
            add_ratios(run_["configs"])
            if s.phase is not None:
                results["phases"][key] = headline(run_["configs"], prec)
            if out is not None:
                write(results, out, schedule, price)
    if check_trainer:
        s = specs[0]
        check = trainer_check(s, precision=prec)
        key = next(iter(results["runs"]))
        ours = next((r for r in results["runs"][key]["configs"] if r["status"] == "ok" and r["backends"] == "fast"
                     and r["mode"] == "eager" and r["precision"] == prec), None)
        if ours:
            check["bench_images_per_s"] = ours["images_per_s"]
            check["ratio_bench_over_trainer"] = ours["images_per_s"] / check["trainer_images_per_s"]
        results["trainer_check"] = {**check, "phase": key}
        if out is not None:
            write(results, out, schedule, price)
    return results


def results_stem(results: dict) -> str:
    """<date>-<device> (then -<preset> for any preset but MicroDiT_XL_2): the results file's name
    without its extension."""
    day = results["meta"]["date"].split()[0]
    dev = re.sub(r"[^a-z0-9]+", "-", results["device"].lower()).strip("-")[:40]
    preset = "" if results["preset"] == "MicroDiT_XL_2" else "-" + results["preset"]
    return f"{day}-{dev}{preset}"


def _fmt(v, spec):
    return spec.format(v) if isinstance(v, (int, float)) else "—"


def table_markdown(results: dict) -> str:
    """Every configuration side by side, then where each step's time goes."""
    head = ("| phase | backends | mode | precision | img/s | step ms median [p25, p75] | model TFLOP/s | "
            "MFU measured | MFU datasheet | peak GiB | vs reference eager | vs reference same mode | "
            "first step s (compile) |")
    lines = [head, "|" + "---|" * 13]
    cats = ["| phase | config | step ms (profiled) | " + " | ".join(CATEGORIES) + " |",
            "|" + "---|" * (3 + len(CATEGORIES))]
    for key, run_ in results["runs"].items():
        for r in run_["configs"]:
            cfg = f"| {key} | {r['backends']} | {r['mode']} | {r['precision']} |"
            if r["status"] != "ok":
                lines.append(f"{cfg} {r['status']}: {r['reason']} |||||||||")
                continue
            lines.append(
                f"{cfg} {r['images_per_s']:.2f} | {r['step_ms_median']:.1f} [{r['step_ms_p25']:.1f}, "
                f"{r['step_ms_p75']:.1f}] | {r['model_tflops']:.3g} | {_fmt(r['mfu'], '{:.1%}')} | "
                f"{_fmt(r['mfu_datasheet'], '{:.1%}')} | {r['peak_mem_gib']:.2f} | "
                f"{_fmt(r.get('speedup_vs_reference_eager'), '{:.2f}x')} | "
                f"{_fmt(r.get('speedup_vs_reference_same_mode'), '{:.2f}x')} | "
                f"{_fmt(r.get('first_step_ms', 0) / 1e3, '{:.1f}')} |")
            prof = r["profile"]
            cats.append(f"| {key} | {r['backends']}/{r['mode']}/{r['precision']} | {prof['step_ms']:.1f} | "
                        + " | ".join(f"{prof['share'][c]:.0%}" for c in CATEGORIES) + " |")
    p = results["peaks"]
    sheet = {k: v for k, v in p["datasheet"].items() if v}
    notes = [f"Peaks: measured {p['measured_dtype']} matmul {p['measured_tflops']:.3g} TFLOP/s in this process; "
             f"datasheet {sheet or 'unknown for this device'}. {results['note']}"]
    if "trainer_check" in results:
        c = results["trainer_check"]
        notes.append(f"Trainer check (phase {c['phase']}, {c['backends']}/{c['mode']}/{c['precision']}): "
                     f"Trainer.run logged {c['trainer_images_per_s']:.2f} img/s, the bench measured "
                     f"{_fmt(c.get('bench_images_per_s'), '{:.2f}')} (ratio {_fmt(c.get('ratio_bench_over_trainer'), '{:.2f}')}).")
    return "\n".join(lines + [""] + cats + [""] + notes) + "\n"


def write(results: dict, out, schedule=None, price: float = cost_mod.PAPER_PRICE) -> dict:
    """OUT/<date>-<device>.json (with the cost), .md (tables and cost) and -cost.{json,md,png}."""
    out = Path(out)
    stem = results_stem(results)
    results["cost"] = cost_mod.write_report(results, out, stem, schedule, price)
    paths = {"json": out / f"{stem}.json", "markdown": out / f"{stem}.md"}
    paths["json"].write_text(json.dumps(results, indent=1))
    md = (f"# microdit bench: {results['preset']} on {results['device']}\n\n"
          f"Commit {results['commit']}, torch {results['torch']}, {results['meta']['date']}, "
          f"{results['meta']['load']}.\n\n" + table_markdown(results) + "\n"
          + cost_mod.report_markdown(results["cost"]).replace("# microdit cost report", "## Cost"))
    paths["markdown"].write_text(md)
    return {**{k: str(v) for k, v in paths.items()}, **{f"cost_{k}": v for k, v in results["cost"]["files"].items()}}


def stamp() -> str:
    return time.strftime("%H:%M:%S")
