"""`microdit demo`: the embedded default end to end: prepare shapes, train, sample, score, report."""
from __future__ import annotations

import os
import platform
import time
from pathlib import Path

import torch

PROMPTS = [
    "a large red circle in the center",
    "a large blue square in the center",
    "a large green triangle in the center",
    "a large yellow circle in the center",
    "a small purple square at the top left",
    "a small orange circle at the bottom right",
    "a large white diamond in the center",
    "a small red square on the left and a large blue circle on the right",
]


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU only ({os.cpu_count()} cores, {cpu})"
    return f"{dev}; Python {platform.python_version()}, torch {torch.__version__}"


def plot_loss(curve: list, path: Path, width: int = 480, height: int = 240) -> Path:
    """A plain line plot of (step, loss) as PNG (no plotting library needed)."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)
    if len(curve) >= 2:
        steps, losses = zip(*curve)
        lo, hi = min(losses), max(losses)
        pad = 30

        def xy(s, v):
            x = pad + (s - steps[0]) / max(steps[-1] - steps[0], 1) * (width - 2 * pad)
            y = height - pad - (v - lo) / max(hi - lo, 1e-9) * (height - 2 * pad)
            return x, y

        d.line([xy(s, v) for s, v in curve], fill=(30, 90, 200), width=2)
        d.rectangle([pad, pad, width - pad, height - pad], outline=(160, 160, 160))
        d.text((pad, 8), f"loss {hi:.3f} .. {lo:.3f}", fill="black")
        d.text((pad, height - pad + 8), f"step {steps[0]} .. {steps[-1]}", fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def run_demo(out="runs/demo", *, steps: int | None = None, resume: bool = False) -> Path:
    """The embedded default end to end: prepare shapes, train (the demo config, `steps` if given),
    sample the demo prompts with the EMA weights, score with ShapesEval, write OUT/REPORT.md."""
    from ..pipeline import generate_images
    from .config import load_config
    from .run import evaluate, train

    out = Path(out)
    # The sampler settings are the recipe's (configs/demo.yaml), the same as its training grids.
    sampling = load_config("demo").train
    times = {}
    t0 = time.perf_counter()
    summary = train("demo", [f"train.steps={steps}"] if steps else [], out=str(out), resume=resume)
    times["prepare_and_train_s"] = time.perf_counter() - t0
    t1 = time.perf_counter()
    common = dict(steps=sampling.sample_steps, guidance=sampling.sample_guidance, seed=0, ema=True, device="auto")
    generate_images(str(out), PROMPTS, out=str(out / "final_samples"), num_per_prompt=4, dtype="float32", **common)
    times["sample_s"] = time.perf_counter() - t1
    t2 = time.perf_counter()
    scores = evaluate(str(out), out=str(out / "eval.json"), num=120, **common)
    times["eval_s"] = time.perf_counter() - t2
    times["total_s"] = time.perf_counter() - t0
    if scores is None:  # not the main rank: it writes the report
        return out / "REPORT.md"
    plot_loss(summary["loss_curve"], out / "loss.png")
    report = write_report(out, summary, scores, times)
    print(f"\ndemo report: {report}")
    return report


def cmd_demo(args) -> int:
    run_demo(args.out, steps=args.steps, resume=args.resume)
    return 0


def write_report(out: Path, summary: dict, scores: dict, times: dict) -> Path:
    curve = summary["loss_curve"]
    picks = [curve[i] for i in sorted({0, len(curve) // 4, len(curve) // 2, 3 * len(curve) // 4, len(curve) - 1})]
    cats = ["single_object", "two_objects", "counting", "colors", "position", "color_attribution", "overall"]
    lines = [
        "# microdit demo report", "",
        f"Machine: {machine()}", "",
        f"Model: {summary['parameters']:,} parameters; {summary['steps']} steps "
        f"({summary['skipped_steps']} skipped), {summary['precision']}, device {summary['device']}.", "",
        "| stage | seconds |", "|---|---|",
        *[f"| {k.removesuffix('_s').replace('_', ' ')} | {v:.0f} |" for k, v in times.items()], "",
        "Loss (EDM, masked): " + ", ".join(f"step {s}: {v:.3f}" for s, v in picks) + " (`loss.png`)", "",
        f"ShapesEval ({scores['num_prompts']} prompts, EMA weights, {scores['steps']} Heun steps, "
        f"guidance {scores['guidance']}):", "",
        "| " + " | ".join(cats) + " |", "|" + "---|" * len(cats),
        "| " + " | ".join(f"{scores.get(c, float('nan')):.2f}" for c in cats) + " |", "",
        f"Background grain: {scores.get('background_noise', float('nan')):.1f} of 255 rms (the samples' "
        "pixels near their background colour; 0 in the training images).", "",
        "## Samples", "",
        "One row per prompt, four seeds each (`final_samples/grid.png`); training-time grids are in `samples/`.", "",
        "![samples](final_samples/grid.png)", "",
        *[f"{i + 1}. {p}" for i, p in enumerate(PROMPTS)], "",
        "![loss](loss.png)", "",
        "## What you should see", "",
        "- The loss falls fast in the first ~200 steps, then slowly; it stays noisy because every step "
        "draws new noise levels.",
        "- What this budget teaches (docs/demo_experiments.md, fifth to ninth rounds): the first "
        "600 steps, at high noise only, teach where the caption puts each object; the rest, its "
        "colour, size and outline. Each sample should show the prompted shape in the prompt's "
        "colour, place and size: round circles, square squares, pointed triangles and diamonds, "
        "with slightly ragged edges and a light grey grain on the background, about 5 of 255 "
        "(the loss weighs the objects' tokens 5x, `diffusion.foreground_weight`, so the plain "
        "background's last noise gets less of it; it shrinks with more steps). ShapesEval should "
        "read about 0.85 overall, single objects and colours about 0.9, position about 0.85 (0.81 "
        "to 0.94 across the seeds and machines tried; a different machine's float rounding "
        "changes the run, not its level).",
        "- The same command gives the same numbers again (seeded data, noise and sampling).",
        "- Token-sized (4 x 4 px) coloured squares scattered over the image mean the model did not "
        "learn the layout at high noise: `python -m benches.demo_experiments --probe "
        "RUN/checkpoints/step_NNNNNNNN.pt` shows it (rel mse near 1 at sigma 40). Check that the "
        "config keeps `diffusion.high_noise_steps` and `model.overrides.init_std` (without either, "
        "the layout came within 3,000 steps in one run of five). If the trainer warned at step 0 "
        "that the latents' std is far from `diffusion.sigma_data`, fix the scale first.", "",
        "## Going further", "",
        "- More steps: `microdit train --config demo --steps 6000 --out runs/longer` (about 18 "
        "minutes of this 2-core CPU). Not run with this recipe; with 50% masking, 6,000 steps "
        "scored 0.90 overall against 0.66-0.75 at 4,000-4,500, with half the background grain "
        "(docs/demo_experiments.md, seventh and eighth rounds).",
        "- A bigger model: `microdit train --config demo model.preset=MicroDiT_Tiny_2 --out runs/tiny` "
        "(tens of times the compute per step: a GPU job).",
        "- A GPU: the same commands use it when one is visible (bf16 autocast); raise "
        "`train.global_batch` and `train.steps` with it.",
        "- Your own images: a folder of images with a `.txt` caption beside each, then "
        "`microdit prepare FOLDER OUT --resolution 32 --codec pixels:2:S` and "
        "`microdit train --data OUT --out runs/mine`. Choose S so that the latents' std is about 0.9 "
        "(S = 0.9 / std of the images in [-1, 1]: 5 for the demo's grey Shapes, 1 for black-and-white "
        "images); the trainer's step-0 warning tells you the value. `microdit sample runs/mine "
        "\"your prompt\" --ema --out samples/` draws from it. The demo config weighs tokens that "
        "stand out from a flat background 5x (`diffusion.foreground_weight`); for images without "
        "one (photographs, textures) set `diffusion.foreground_weight=1`, the published loss.",
    ]
    path = out / "REPORT.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="prepare shapes, train a small MicroDiT, sample, score, report")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--steps", type=int, help="training steps (default: the demo config's)")
    p.add_argument("--resume", action="store_true")
    p.set_defaults(fn=cmd_demo)
