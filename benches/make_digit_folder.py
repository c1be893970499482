"""A small captioned image folder with a different look from Shapes: grayscale digits drawn with fonts.

Each image is a 32 x 32 grayscale digit (DejaVu fonts, several weights, jittered size and offset,
light blur) either white on black or black on white, with a caption such as
"a white digit seven on a black background". Used to try the demo recipe on someone else's
images (docs/demo_experiments.md):

    python -m benches.make_digit_folder /tmp/digits --num 1500
    microdit prepare /tmp/digits /tmp/digit_shards --resolution 32 --codec pixels:2
    microdit train --data /tmp/digit_shards --out runs/digits
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
FONTS = ("DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSerif.ttf", "DejaVuSansMono-Bold.ttf")
FONT_DIRS = ("/usr/share/fonts/truetype/dejavu",)


def _font(name: str, size: int):
    for d in FONT_DIRS:
        path = Path(d) / name
        if path.is_file():
            return ImageFont.truetype(str(path), size)
    return ImageFont.load_default(size=size)  # Pillow >= 10.1: a scalable built-in font


def digit_image(rng: np.random.Generator, digit: int, white_on_black: bool, side: int = 32) -> Image.Image:
    """One digit, drawn 4x larger and downsampled (anti-aliased)."""
    big = side * 4
    fg, bg = (255, 0) if white_on_black else (0, 255)
    img = Image.new("L", (big, big), bg)
    font = _font(FONTS[int(rng.integers(len(FONTS)))], int(big * rng.uniform(0.65, 0.85)))
    d = ImageDraw.Draw(img)
    x0, y0, x1, y1 = d.textbbox((0, 0), str(digit), font=font)
    dx, dy = rng.uniform(-0.06, 0.06, size=2) * big
    d.text(((big - (x1 - x0)) / 2 - x0 + dx, (big - (y1 - y0)) / 2 - y0 + dy), str(digit), fill=fg, font=font)
    img = img.filter(ImageFilter.GaussianBlur(1.0)).resize((side, side), Image.Resampling.LANCZOS)
    return img.convert("RGB")


def make_folder(out: Path, num: int, seed: int = 0, digits=tuple(range(10))) -> int:
    """`num` captioned digits (drawn from `digits`) into `out`; returns how many were written."""
    digits = tuple(int(d) for d in digits)
    if not digits or any(not 0 <= d <= 9 for d in digits):
        raise ValueError(f"digits must be a non-empty list of 0..9, got {digits}")
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(num):
        digit, wob = digits[int(rng.integers(len(digits)))], bool(rng.integers(2))
        digit_image(rng, digit, wob).save(out / f"{i:05d}.png")
        fg, bg = ("white", "black") if wob else ("black", "white")
        (out / f"{i:05d}.txt").write_text(f"a {fg} digit {NAMES[digit]} on a {bg} background\n")
    return num


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out")
    p.add_argument("--num", type=int, default=1500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--digits", default="0123456789", help="the classes, e.g. 0137 (default: all ten)")
    args = p.parse_args(argv)
    n = make_folder(Path(args.out), args.num, args.seed, [int(c) for c in args.digits])
    print(f"wrote {n} images to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
