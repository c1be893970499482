"""Score a run trained on a `make_digit_folder` folder: right digit and right polarity.

A nearest-centroid classifier built from the folder's own images (grey levels, ink made positive,
centred, unit norm; centroids from the first half, its accuracy reported on the second half)
reads each sample; the polarity is read from the border. Crude, but it needs no trained network,
and its accuracy on real images says how far to trust it.

    python -m benches.digit_score FOLDER RUN [--per-prompt 8] [--grid GRID.png]

`--grid` also saves the samples: one row per prompt (the digits in order, white on black then
black on white), `--per-prompt` columns, each image magnified 3x.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

WORDS = {"zero": 0, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8,
         "nine": 9}


def _border(g: np.ndarray) -> float:
    return float(np.median(np.concatenate([g[0], g[-1], g[:, 0], g[:, -1]])))


def ink(image: np.ndarray) -> np.ndarray:
    """(H, W[, 3]) uint8 -> float grey image, ink positive (dark backgrounds kept), centred, unit norm."""
    g = image.astype(np.float32)
    g = g.mean(-1) if g.ndim == 3 else g
    if _border(g) > 127:
        g = 255 - g
    g = g - g.mean()
    return g / (np.linalg.norm(g) + 1e-6)


def caption_digit(caption: str) -> int:
    words = caption.split()
    if "digit" not in words or words.index("digit") + 1 >= len(words) or words[words.index("digit") + 1] not in WORDS:
        raise ValueError(f"not a make_digit_folder caption: {caption!r}")
    return WORDS[words[words.index("digit") + 1]]


class Centroids:
    def __init__(self, images, digits):
        X = np.stack([ink(a) for a in images])
        y = np.asarray(digits)
        self.digits = sorted(set(y.tolist()))
        self.centroids = np.stack([X[y == d].mean(0) for d in self.digits])

    def __call__(self, image) -> int:
        return self.digits[int(np.argmax((self.centroids * ink(image)).sum(axis=(1, 2))))]


def load_folder(folder):
    from PIL import Image

    images, digits = [], []
    for png in sorted(Path(folder).glob("*.png")):
        txt = png.with_suffix(".txt")
        if not txt.exists():
            raise FileNotFoundError(f"{png}: no caption file {txt.name} beside it")
        images.append(np.asarray(Image.open(png).convert("RGB")))
        digits.append(caption_digit(txt.read_text()))
    if len(images) < 4:
        raise ValueError(f"{folder}: needs a make_digit_folder folder (found {len(images)} captioned images)")
    return images, digits


def save_grid(samples: np.ndarray, rows: int, path, scale: int = 3, gap: int = 2) -> Path:
    """(rows * cols, H, W, 3) uint8 samples, row-major -> one PNG, a mid-grey gap between images
    (white and black digits both stand out from it), no border."""
    from microdit.train.sampling import save_grid as tile

    n = samples.shape[0]
    if rows < 1 or n % rows:
        raise ValueError(f"{n} samples do not fill {rows} rows")
    return tile(samples, path, n // rows, gap=gap, border=0, fill=128, scale=scale)


def score(folder, run, per_prompt: int = 8, steps: int = 20, guidance: float = 3.0, grid=None) -> dict:
    from microdit.pipeline import MicroDiTPipeline

    images, digits = load_folder(folder)
    half = len(images) // 2
    clf = Centroids(images[:half], digits[:half])
    real = float(np.mean([clf(a) == d for a, d in zip(images[half:], digits[half:])]))
    names = {v: k for k, v in WORDS.items()}
    prompts = [f"a {c} digit {names[d]} on a {b} background" for d in clf.digits
               for c, b in (("white", "black"), ("black", "white"))]
    pipe = MicroDiTPipeline.from_run(run, ema=True, device="cpu", dtype="float32")
    samples = pipe.images(prompts, steps=steps, guidance=guidance, seed=0, num_per_prompt=per_prompt)
    if grid is not None:
        save_grid(samples, len(prompts), grid)
    right = polarity = 0
    for i, p in enumerate(prompts):
        for a in samples[i * per_prompt:(i + 1) * per_prompt]:
            right += clf(a) == caption_digit(p)
            polarity += (_border(a.astype(np.float32).mean(-1)) < 128) == p.endswith("black background")
    n = len(samples)
    return {"run": str(run), "samples": n, "right_digit": right / n, "right_polarity": polarity / n,
            "classifier_on_real_images": real, "digits": clf.digits}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folder")
    p.add_argument("run")
    p.add_argument("--per-prompt", type=int, default=8)
    p.add_argument("--grid", help="also save the samples as one PNG (a row per prompt)")
    args = p.parse_args(argv)
    print(json.dumps(score(args.folder, args.run, args.per_prompt, grid=args.grid)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
