"""What the paper's schedule (or yours) costs at the measured images/s: GPU-hours and dollars,
beside the paper's own 504 H100-hours ($1,890 at $3.75 per H100-hour).

The paper reports only the total (2.6 days on 8 H100). Its per-phase rate is derived here the
one consistent way the total allows: a single achieved FLOP rate for the whole run (the
schedule's analytic training FLOPs over 504 GPU-hours; 181 TFLOP/s per H100, 18% of the bf16
datasheet peak), divided by each phase's training FLOPs per image. That gives about 642, 254,
169 and 60 images/s per GPU for phases 1 to 4 (MicroDiT_XL_2).
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from ..models.flops import model_flops
from ..models.presets import preset_config

PAPER_GPU_HOURS = 504.0
PAPER_PRICE = 3.75  # $ per H100-hour
PAPER_SCHEDULE = {1: (250_000, 2048), 2: (30_000, 2048), 3: (50_000, 2048), 4: (5_000, 2048)}  # steps, global batch


def training_flops_per_image(phase: int, preset: str = "MicroDiT_XL_2") -> float:
    from .step import PHASES

    _, size, mask = PHASES[phase]
    return model_flops(preset_config(preset, input_size=size), mask).training


def paper_rates(preset: str = "MicroDiT_XL_2") -> dict[int, float]:
    """The paper's images/s per GPU in each phase (derived: see the module docstring)."""
    flops = {p: training_flops_per_image(p, preset) for p in PAPER_SCHEDULE}
    work = sum(steps * batch * flops[p] for p, (steps, batch) in PAPER_SCHEDULE.items())
    rate = work / (PAPER_GPU_HOURS * 3600)  # FLOP/s per GPU over the whole run
    return {p: rate / flops[p] for p in PAPER_SCHEDULE}


def gpu_hours(steps: int, global_batch: int, images_per_s: float) -> float:
    """GPU-hours to push steps x global_batch images through at images_per_s per GPU."""
    if images_per_s <= 0:
        raise ValueError(f"images_per_s must be > 0; got {images_per_s}")
    return steps * global_batch / images_per_s / 3600


def parse_schedule(items) -> dict[int, tuple[int, int]]:
    """A schedule from `PHASE:STEPSxBATCH` strings (`1:250000x2048`) and/or training-config YAML
    files (their train.steps, train.global_batch; the phase from resolution and mask ratio)."""
    from ..train.config import load_config
    from .step import PHASES

    out = {}
    for item in items:
        m = re.fullmatch(r"\s*([1-4])\s*:\s*(\d+)\s*x\s*(\d+)\s*", str(item))
        if m:
            out[int(m[1])] = (int(m[2]), int(m[3]))
            continue
        if not str(item).endswith((".yaml", ".yml")):
            raise ValueError(f"--schedule {item!r}: expected PHASE:STEPSxBATCH (e.g. 1:250000x2048) or a config .yaml")
        cfg = load_config(str(item))
        key = (cfg.data.resolution // 8, cfg.diffusion.mask_ratio)  # the SDXL VAE's 8x downsampling
        phase = next((p for p, (_, size, mask) in PHASES.items() if (size, mask) == key), None)
        if phase is None:
            raise ValueError(f"--schedule {item}: resolution {cfg.data.resolution} with mask ratio "
                             f"{cfg.diffusion.mask_ratio} is none of the measured phases {sorted(PHASES)}")
        out[phase] = (cfg.train.steps, cfg.train.global_batch)
    return out


def cost_report(measured: dict, schedule: dict | None = None, price: float = PAPER_PRICE,
                preset: str = "MicroDiT_XL_2") -> dict:
    """`measured`: {phase: {"fast": images/s, "reference": images/s}} (per GPU). GPU-hours and
    dollars of `schedule` ({phase: (steps, global batch)}, default the paper's) for each, and
    the paper's at its derived rate."""
    if price <= 0:
        raise ValueError(f"--price must be > 0 ($ per GPU-hour); got {price}")
    schedule = {int(k): tuple(v) for k, v in (schedule or PAPER_SCHEDULE).items()}
    paper = paper_rates()
    rows, totals, missing = {}, {"paper": 0.0, "fast": 0.0, "reference": 0.0}, []
    for p, (steps, batch) in sorted(schedule.items()):
        row = {"steps": steps, "global_batch": batch, "paper_images_per_s": paper[p],
               "paper_gpu_hours": gpu_hours(steps, batch, paper[p])}
        totals["paper"] += row["paper_gpu_hours"]
        got = measured.get(p) or measured.get(str(p)) or {}
        for kind in ("fast", "reference"):
            ips = got.get(kind)
            if ips:
                row[f"{kind}_images_per_s"] = ips
                row[f"{kind}_gpu_hours"] = gpu_hours(steps, batch, ips)
                totals[kind] += row[f"{kind}_gpu_hours"]
            else:
                missing.append(f"phase {p} {kind}")
        if got.get("fast") and got.get("reference"):
            row["fast_over_reference"] = got["fast"] / got["reference"]
        rows[str(p)] = row
    total = {f"{k}_gpu_hours": v for k, v in totals.items()}
    total.update({f"{k}_dollars": v * price for k, v in totals.items()})
    return {"preset_for_flops": preset, "price_per_gpu_hour": price, "paper_total_gpu_hours": PAPER_GPU_HOURS,
            "paper_total_dollars": PAPER_GPU_HOURS * PAPER_PRICE, "phases": rows, "total": total,
            "incomplete": missing}


def _f(v, fmt="{:,.1f}"):
    return fmt.format(v) if isinstance(v, (int, float)) else "—"


def report_markdown(cost: dict, meta: dict | None = None) -> str:
    meta = meta or {}
    lines = ["# microdit cost report", ""]
    if meta:
        lines += [f"Measured on {meta.get('device')} (commit {meta.get('commit')}, torch {meta.get('torch')}, "
                  f"{meta.get('date')}; {meta.get('load')}). Images/s are per device.", ""]
    lines += [f"Price ${cost['price_per_gpu_hour']:.2f} per GPU-hour. The paper: {cost['paper_total_gpu_hours']:.0f} "
              f"H100-hours, ${cost['paper_total_dollars']:,.0f}; its per-phase rate is derived from that total "
              "(one FLOP rate over the run, see microdit/bench/cost.py).", "",
              "| phase | steps x batch | paper img/s | paper GPU-h | reference img/s | reference GPU-h | "
              "fast img/s | fast GPU-h | fast / reference |", "|---|---|---|---|---|---|---|---|---|"]
    for p, r in cost["phases"].items():
        lines.append(f"| {p} | {r['steps']:,} x {r['global_batch']:,} | {_f(r['paper_images_per_s'])} | "
                     f"{_f(r['paper_gpu_hours'])} | {_f(r.get('reference_images_per_s'), '{:,.2f}')} | "
                     f"{_f(r.get('reference_gpu_hours'))} | {_f(r.get('fast_images_per_s'), '{:,.2f}')} | "
                     f"{_f(r.get('fast_gpu_hours'))} | {_f(r.get('fast_over_reference'), '{:.2f}x')} |")
    t = cost["total"]
    lines.append(f"| **total** | | | **{t['paper_gpu_hours']:,.1f}** (${t['paper_dollars']:,.0f}) | | "
                 f"**{t['reference_gpu_hours']:,.1f}** (${t['reference_dollars']:,.0f}) | | "
                 f"**{t['fast_gpu_hours']:,.1f}** (${t['fast_dollars']:,.0f}) | |")
    if cost["incomplete"]:
        lines += ["", "Not measured (left out of the totals): " + ", ".join(cost["incomplete"]) + "."]
    return "\n".join(lines) + "\n"


def _short(v: float) -> str:
    return f"{v / 1000:.1f}k" if v >= 1000 else f"{v:.3g}"


def plot_cost(cost: dict, path: Path, width: int = 720, height: int = 320) -> Path:
    """Per-phase GPU-hours (log scale: paper, reference, fast) and the fast/reference ratio, as PNG."""
    import math

    from PIL import Image, ImageDraw

    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)
    colours = {"paper": (150, 150, 150), "reference": (220, 120, 40), "fast": (30, 90, 200)}
    phases = list(cost["phases"].items())
    vals = [r.get(f"{k}_gpu_hours") for _, r in phases for k in colours]
    vals = [v for v in vals if v]
    lo, hi = math.log10(min(vals)) - 0.3, math.log10(max(vals)) + 0.3
    pad, split = 36, int(width * 0.68)
    top, bottom = pad, height - pad
    d.text((pad, 6), "GPU-hours per phase (log scale): paper / reference / fast", fill="black")
    group = (split - 2 * pad) / max(len(phases), 1)
    bar = group / 4
    for i, (p, r) in enumerate(phases):
        x0 = pad + i * group + bar / 2
        for j, k in enumerate(colours):
            v = r.get(f"{k}_gpu_hours")
            if not v:
                continue
            y = bottom - (math.log10(v) - lo) / (hi - lo) * (bottom - top)
            d.rectangle([x0 + j * bar, y, x0 + (j + 1) * bar - 2, bottom], fill=colours[k])
            d.text((x0 + j * bar, y - 11 - 10 * (j % 2)), _short(v), fill="black")
        d.text((x0 + bar, bottom + 6), f"phase {p}", fill="black")
    d.line([pad, bottom, split - pad // 2, bottom], fill=(120, 120, 120))
    for j, (k, c) in enumerate(colours.items()):
        d.rectangle([pad + j * 90, height - 14, pad + j * 90 + 10, height - 4], fill=c)
        d.text((pad + j * 90 + 14, height - 16), k, fill="black")
    # Right panel: the ratio fast / reference, with 1.0 marked.
    ratios = [(p, r.get("fast_over_reference")) for p, r in phases]
    rmax = max([v for _, v in ratios if v] + [1.0]) * 1.2
    d.text((split, 6), "fast / reference (img/s)", fill="black")
    y1 = bottom - 1.0 / rmax * (bottom - top)
    d.line([split, y1, width - 10, y1], fill=(160, 160, 160))
    w = (width - 10 - split) / max(len(ratios), 1)
    for i, (p, v) in enumerate(ratios):
        if v:
            y = bottom - v / rmax * (bottom - top)
            d.rectangle([split + i * w + 4, y, split + (i + 1) * w - 4, bottom], fill=colours["fast"])
            d.text((split + i * w + 4, y - 11), f"{v:.2f}x", fill="black")
        d.text((split + i * w + 4, bottom + 6), str(p), fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def write_report(results: dict, out: Path, stem: str, schedule=None, price: float = PAPER_PRICE) -> dict:
    """The cost of `results` (a `microdit bench` results dict): OUT/STEM-cost.{json,md,png}."""
    measured = {int(p): {k: v.get("images_per_s") for k, v in kinds.items() if isinstance(v, dict)}
                for p, kinds in results.get("phases", {}).items()}
    cost = cost_report(measured, schedule, price)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / f"{stem}-cost.json", "markdown": out / f"{stem}-cost.md", "png": out / f"{stem}-cost.png"}
    paths["json"].write_text(json.dumps(cost, indent=1))
    paths["markdown"].write_text(report_markdown(cost, results.get("meta")))
    plot_cost(cost, paths["png"])
    cost["files"] = {k: str(v) for k, v in paths.items()}
    return cost
