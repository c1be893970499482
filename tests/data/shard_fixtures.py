"""Helpers for the data-pipeline tests: a tiny text encoder, image folders, manifests, webdataset tars."""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

BAD_FILES = {  # planted bad file -> a word its skip reason must contain
    "truncated.jpg": "decode",
    "not_an_image.png": "decode",
    "one_pixel.png": "too small",
    "no_caption.jpg": "missing caption",
    "empty_caption.jpg": "empty caption",
}


class TinyTextEncoder:
    """A deterministic stand-in for a text encoder: byte embeddings, fast enough for many tests."""

    name, dim, max_length = "tiny-bytes", 8, 24

    def encode(self, captions):
        n = len(captions)
        states = torch.zeros(n, self.max_length, self.dim)
        mask = torch.zeros(n, self.max_length, dtype=torch.bool)
        table = torch.linspace(-1.0, 1.0, 256 * self.dim).reshape(256, self.dim)
        for i, c in enumerate(captions):
            b = list(c.encode())[: self.max_length]
            states[i, : len(b)] = table[b]
            mask[i, : len(b)] = True
        return states, mask

    def metadata(self):
        return {"name": self.name, "dim": self.dim, "max_length": self.max_length}

    def to(self, device):
        return self


def random_image(rng, w: int, h: int) -> Image.Image:
    """A smooth random RGB image (compresses like a photo, unlike noise)."""
    base = rng.integers(0, 256, (max(h // 8, 1), max(w // 8, 1), 3), dtype=np.uint8)
    return Image.fromarray(base).resize((w, h), Image.Resampling.BILINEAR)


def image_bytes(image: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


def make_image_folder(root: Path, n_good: int = 6, bad: bool = False, seed: int = 0) -> list[str]:
    """Good captioned images (various sizes and formats, in a subfolder too); with `bad`, the
    planted bad files of BAD_FILES. Returns the good images' relative paths, sorted."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    (root / "sub").mkdir(exist_ok=True)
    good = []
    formats = [("jpg", "JPEG"), ("png", "PNG"), ("webp", "WEBP")]
    for i in range(n_good):
        ext, fmt = formats[i % 3]
        rel = f"{'sub/' if i % 2 else ''}img{i:03d}.{ext}"
        w, h = [(48, 40), (40, 64), (32, 32), (100, 50)][i % 4]
        (root / rel).write_bytes(image_bytes(random_image(rng, w, h), fmt))
        (root / rel).with_suffix(".txt").write_text(f"a picture number {i}\n")
        good.append(rel)
    if bad:
        full = image_bytes(random_image(rng, 64, 64), "JPEG")
        (root / "truncated.jpg").write_bytes(full[: len(full) // 2])
        (root / "truncated.txt").write_text("a truncated picture")
        (root / "not_an_image.png").write_text("this is text, not a PNG")
        (root / "not_an_image.txt").write_text("a lie")
        Image.new("RGB", (1, 1), (255, 0, 0)).save(root / "one_pixel.png")
        (root / "one_pixel.txt").write_text("a single red pixel")
        random_image(rng, 40, 40).save(root / "no_caption.jpg")
        random_image(rng, 40, 40).save(root / "empty_caption.jpg")
        (root / "empty_caption.txt").write_text("  \n")
    return sorted(good)


def make_tar_shards(root: Path, n: int = 7, per_tar: int = 4, seed: int = 0) -> list[str]:
    """img2dataset-style tars: KEY.jpg|png + KEY.txt and/or KEY.json; returns the good keys in order.

    Also plants a key with no caption and a caption with no image (both skipped).
    """
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    keys = []

    def add(tf, name, data):
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))

    for t in range(0, n, per_tar):
        with tarfile.open(root / f"{t // per_tar:05d}.tar", "w") as tf:
            for i in range(t, min(n, t + per_tar)):
                key = f"{i:09d}"
                ext, fmt = ("jpg", "JPEG") if i % 2 else ("png", "PNG")
                add(tf, f"{key}.{ext}", image_bytes(random_image(rng, 40, 36), fmt))
                if i % 3 != 1:
                    add(tf, f"{key}.txt", f"tar caption {i}".encode())
                add(tf, f"{key}.json", json.dumps({"caption": f"tar caption {i}", "key": key}).encode())
                keys.append(key)
        (root / f"{t // per_tar:05d}_stats.json").write_text("{}")
    with tarfile.open(root / "99999.tar", "w") as tf:
        add(tf, "nocap.jpg", image_bytes(random_image(rng, 40, 40), "JPEG"))
        add(tf, "noimage.txt", b"a caption without its image")
    return keys


def make_manifest(root: Path, kind: str, n: int = 5, seed: int = 0) -> tuple[Path, list[str]]:
    """A .jsonl or .csv manifest over images in root/images, plus one missing file; (path, good captions)."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    rows, captions = [], []
    for i in range(n):
        rel = f"images/m{i}.png"
        random_image(rng, 40, 40).save(root / rel)
        image_key = ["image", "path", "file"][i % 3]
        caption_key = ["caption", "text"][i % 2]
        rows.append({image_key: rel, caption_key: f"manifest caption {i}"})
        captions.append(f"manifest caption {i}")
    rows.append({"image": "images/missing.png", "caption": "gone"})
    path = root / f"manifest.{kind}"
    if kind == "jsonl":
        path.write_text("\n".join(json.dumps(r) for r in rows) + "\n{not json\n")
    else:
        import csv

        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["path", "caption"])
            w.writeheader()
            for r in rows:
                w.writerow({"path": next(r[k] for k in ("image", "path", "file") if k in r),
                            "caption": next(r[k] for k in ("caption", "text") if k in r)})
    return path, captions
