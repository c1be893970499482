"""Sources of captioned images for `microdit prepare`, and the image preprocessing they share.

A source lists cheap, picklable references to its items in a fixed order (`refs()`), and reads
one item from its reference (`read(ref)`), so that the slow part (decoding, resizing) can run in
worker processes and any contiguous range of items can be redone alone. Kinds:

- `shapes`: the procedural Shapes dataset (`num` items from `seed`), rendered natively at each
  resolution.
- an image folder: every image below it (recursively, sorted by path) with its caption in a
  `.txt` of the same name beside it.
- a `.jsonl` or `.csv` manifest: one item per row, the image under `image`, `path` or `file`
  (relative to the manifest's folder, or absolute) and the caption under `caption` or `text`.
- a folder of webdataset `.tar` shards as img2dataset writes them: members `KEY.jpg|png|webp`
  with `KEY.txt` and/or `KEY.json` (its `caption` or `text` field) beside them. Members are read
  by offset, so items are random-access without unpacking.

Preprocessing (the paper's): EXIF orientation applied, alpha composited on white, RGB, then the
largest centred square scaled to R x R (equivalently: short side resized to R, centre crop), no
flips. A bad item raises `SkipItem` with a reason (undecodable, truncated, smaller than
`min_size` on its short side, missing or empty caption); `prepare` records it and goes on.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import tarfile
import warnings
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
from PIL import Image, ImageOps

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
IMAGE_KEYS = ("image", "path", "file")
CAPTION_KEYS = ("caption", "text")


class SkipItem(Exception):
    """An item that cannot be used; `path` names it and `reason` says why."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = path, reason


@dataclasses.dataclass(frozen=True)
class Item:
    """One usable item: its key, its image at each resolution (uint8 (R, R, 3)) and caption."""

    key: str
    path: str
    images: dict
    caption: str


def default_min_size(resolutions: Sequence[int]) -> int:
    """Smallest accepted short side: half the largest resolution (more than 2x upscaling is mush)."""
    return max(2, max(resolutions) // 2)


def center_crop_resize(image: Image.Image, resolution: int) -> np.ndarray:
    """The largest centred square of `image` scaled to (resolution, resolution), uint8 RGB."""
    w, h = image.size
    s = min(w, h)
    # A fractional box crops and resizes in one resampling pass (no double rounding).
    box = ((w - s) / 2, (h - s) / 2, (w + s) / 2, (h + s) / 2)
    if (w, h) == (resolution, resolution):
        out = image
    else:
        out = image.resize((resolution, resolution), Image.Resampling.BICUBIC, box=box)
    return np.asarray(out, dtype=np.uint8).copy()


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB with any alpha composited on white (transparent logos must not turn black); 16-bit
    grayscale scaled to 8 bits (PIL's convert would clip every value above 255 to white)."""
    if image.mode == "RGB":
        return image
    if image.mode.startswith("I;16") or image.mode == "I":
        # Mode I is what 16-bit PNG/TIFF grayscale decodes to on some PIL versions: 0..65535 too.
        wide = np.asarray(image, dtype=np.float64)
        gray = np.clip(np.rint(wide * (255.0 / 65535.0)), 0, 255).astype(np.uint8)
        return Image.fromarray(gray, mode="L").convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def decode_image(raw, path: str, resolutions: Sequence[int], min_size: int) -> dict:
    """Decoded, checked and preprocessed `raw` (bytes, PIL image or uint8 array) at each resolution."""
    try:
        with warnings.catch_warnings():
            # A decompression-bomb warning is no reason to fail; the error (2x larger) is caught below.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            if isinstance(raw, np.ndarray):
                if raw.dtype != np.uint8 or raw.ndim != 3 or raw.shape[2] not in (3, 4):
                    raise SkipItem(path, f"array image must be uint8 (H, W, 3|4), got {raw.dtype} {raw.shape}")
                image = Image.fromarray(raw)
            elif isinstance(raw, Image.Image):
                image = raw
            else:
                image = Image.open(io.BytesIO(raw))
            w, h = image.size
            if min(w, h) < min_size:
                raise SkipItem(path, f"image too small: {w}x{h}, short side < {min_size}")
            if getattr(image, "format", None) == "JPEG":
                # Decode big JPEGs at a reduced DCT scale that keeps twice the largest target
                # (PIL's thumbnail rule, reducing_gap=2), so the final resize still antialiases.
                r = 2 * max(resolutions)
                s = min(w, h)
                image.draft("RGB", (max(r, round(w * r / s)), max(r, round(h * r / s))))
            image.load()
            image = to_rgb(ImageOps.exif_transpose(image))
            return {r: center_crop_resize(image, r) for r in resolutions}
    except SkipItem:
        raise
    except Exception as e:  # PIL raises many types for corrupt files: all of them mean "skip"
        raise SkipItem(path, f"cannot decode image: {type(e).__name__}: {e}") from None


def clean_caption(caption, path: str) -> str:
    """The stripped caption, or SkipItem when it is missing or empty."""
    if caption is None:
        raise SkipItem(path, "missing caption")
    if isinstance(caption, bytes):
        try:
            caption = caption.decode("utf-8")
        except UnicodeDecodeError as e:
            raise SkipItem(path, f"caption is not UTF-8: {e}") from None
    if not isinstance(caption, str):
        raise SkipItem(path, f"caption is not a string: {type(caption).__name__}")
    caption = caption.strip()
    if not caption:
        raise SkipItem(path, "empty caption")
    return caption


class Source:
    """A fixed-order list of captioned images; subclasses define refs(), read() and describe()."""

    name = "source"

    def refs(self) -> list:
        """Picklable references to every item, in the source's fixed order."""
        raise NotImplementedError

    def read(self, ref) -> tuple[str, str, object, str]:
        """(key, path, raw image: bytes | PIL image | uint8 array, caption) of `ref`; SkipItem if bad."""
        raise NotImplementedError

    def describe(self) -> dict:
        """What identifies this source's contents (recorded with the shards)."""
        return {"kind": self.name}

    def load(self, ref, resolutions: Sequence[int], min_size: int) -> Item:
        """The item of `ref`, decoded and preprocessed at each resolution; SkipItem if bad."""
        key, path, raw, caption = self.read(ref)
        caption = clean_caption(caption, path)
        return Item(key, path, decode_image(raw, path, resolutions, min_size), caption)

    def __iter__(self) -> Iterator[tuple[str, object, str]]:
        """(key, raw image, caption) of every readable item; bad ones are left out."""
        for ref in self.refs():
            try:
                key, _, raw, caption = self.read(ref)
            except SkipItem:
                continue
            yield key, raw, caption


class ShapesSource(Source):
    """The procedural Shapes dataset: `num` items from `seed`, rendered natively at each size."""

    name = "shapes"

    def __init__(self, num: int, seed: int = 0, options: dict | None = None):
        if num is None or num < 0:
            raise ValueError(f"the shapes source needs --num N >= 0, got {num}")
        self.num, self.seed = num, seed
        # ShapesDataset keyword arguments (see shapes_options): a distribution tuned for a task.
        self.options = dict(options or {})
        self._dataset(32)  # bad options fail here, naming themselves

    def refs(self) -> list:
        return list(range(self.num))

    def _dataset(self, resolution: int):
        from .shapes import ShapesDataset

        return ShapesDataset(self.num, resolution=resolution, seed=self.seed, **self.options)

    def read(self, ref):
        item = self._dataset(32)[ref]
        return f"{self.seed}-{ref:08d}", f"shapes:{self.seed}:{ref}", item["image"], item["caption"]

    def load(self, ref, resolutions, min_size):
        # Rendering at each size keeps edges sharp where resizing one render would blur them.
        items = {r: self._dataset(r)[ref] for r in resolutions}
        caption = items[resolutions[0]]["caption"]
        return Item(f"{self.seed}-{ref:08d}", f"shapes:{self.seed}:{ref}",
                    {r: np.ascontiguousarray(it["image"], dtype=np.uint8) for r, it in items.items()}, caption)

    def describe(self):
        return {"kind": self.name, "num": self.num, "seed": self.seed,
                # JSON's types, so a resumed prepare compares equal to what it recorded
                **({"options": {k: list(v) if isinstance(v, tuple) else v for k, v in self.options.items()}}
                   if self.options else {})}


def shapes_options(spec: str) -> dict:
    """ShapesDataset keyword arguments from a source spec `shapes:key=value,key=value`.

    Keys: `textured` (fraction of textured backgrounds, 0..1), `backgrounds` (background colour
    names joined by `+`, e.g. `grey+slate`), `max_objects` (1..4), `jitter` (the fraction of the
    default position and size jitter, 0..1; 0 draws every object at its cell centre at its nominal
    size). `shapes` alone: the defaults.
    """
    _, _, rest = spec.partition(":")
    out: dict = {}
    for part in filter(None, (p.strip() for p in rest.split(","))):
        key, eq, value = part.partition("=")
        try:
            if not eq:
                raise ValueError("expected key=value")
            if key == "textured":
                out["textured_fraction"] = float(value)
            elif key == "backgrounds":
                out["background_colors"] = tuple(v.strip() for v in value.split("+"))
            elif key == "max_objects":
                out["max_objects"] = int(value)
            elif key == "jitter":
                out["jitter"] = float(value)
            else:
                raise ValueError("known keys: textured, backgrounds, max_objects, jitter")
        except ValueError as e:
            raise ValueError(f"source {spec!r}: bad option {part!r} ({e})") from None
    return out


def _existing(path, what: str, kind) -> Path:
    """`path` resolved (the same listing from any working directory); FileNotFoundError naming
    `what` unless `kind(path)` (Path.is_dir or Path.is_file) holds."""
    path = Path(path)
    if not kind(path):
        raise FileNotFoundError(f"{what} {path} does not exist")
    return path.resolve()


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise SkipItem(str(path), f"cannot read file: {e.strerror or e}") from None


class FolderSource(Source):
    """Images below `root` (recursive, sorted) with a same-name `.txt` caption beside each."""

    name = "folder"

    def __init__(self, root, num: int | None = None):
        self.root = _existing(root, "image folder", Path.is_dir)
        self.num = num

    def refs(self) -> list:
        found = []
        for dirpath, dirnames, filenames in os.walk(self.root):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for f in filenames:
                if not f.startswith(".") and f.lower().endswith(IMAGE_EXTENSIONS):
                    found.append(os.path.relpath(os.path.join(dirpath, f), self.root))
        found.sort()
        return found[: self.num] if self.num is not None else found

    def read(self, ref):
        path = self.root / ref
        caption_path = path.with_suffix(".txt")
        if not caption_path.is_file():
            raise SkipItem(str(path), f"missing caption: no {caption_path.name} beside the image")
        caption = clean_caption(_read_bytes(caption_path), str(path))
        return str(Path(ref).with_suffix("")), str(path), _read_bytes(path), caption

    def describe(self):
        return {"kind": self.name, "root": str(self.root), "num": self.num}


class ManifestSource(Source):
    """A `.jsonl` or `.csv` manifest: image under image/path/file (relative to the manifest), caption under caption/text."""

    name = "manifest"

    def __init__(self, path, num: int | None = None):
        self.path = _existing(path, "manifest", Path.is_file)
        if self.path.suffix.lower() not in (".jsonl", ".csv"):
            raise ValueError(f"manifest {self.path} must be .jsonl or .csv")
        self.num = num

    def _rows(self) -> list:
        """(line label, row dict or error string) per data row."""
        rows = []
        if self.path.suffix.lower() == ".jsonl":
            with open(self.path, encoding="utf-8") as f:
                for n, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        row = json.loads(line)
                        if not isinstance(row, dict):
                            raise ValueError("not a JSON object")
                    except ValueError as e:
                        row = f"bad JSON line: {e}"
                    rows.append((f"{self.path}:{n}", row))
        else:
            with open(self.path, encoding="utf-8", newline="") as f:
                for n, row in enumerate(csv.DictReader(f), 2):
                    rows.append((f"{self.path}:{n}", row))
        return rows

    def refs(self) -> list:
        rows = self._rows()
        return rows[: self.num] if self.num is not None else rows

    def read(self, ref):
        label, row = ref
        if isinstance(row, str):
            raise SkipItem(label, row)
        image = next((row[k] for k in IMAGE_KEYS if row.get(k)), None)
        if image is None:
            raise SkipItem(label, f"no image column (one of {', '.join(IMAGE_KEYS)})")
        if "://" in str(image):
            raise SkipItem(label, f"not a local file: {image}")
        path = Path(image)
        if not path.is_absolute():
            path = self.path.parent / path
        caption = next((row[k] for k in CAPTION_KEYS if row.get(k) is not None), None)
        if not path.is_file():
            raise SkipItem(str(path), "image file not found")
        caption = clean_caption(caption, str(path))
        return str(Path(image).with_suffix("")), str(path), _read_bytes(path), caption

    def describe(self):
        return {"kind": self.name, "path": str(self.path), "num": self.num}


@dataclasses.dataclass(frozen=True)
class TarRef:
    """One webdataset sample: its tar file, key, and (name, offset, size) of each member."""

    tar: str
    key: str
    image: tuple | None
    txt: tuple | None
    json: tuple | None
    error: str | None = None


def _split_member_name(name: str) -> tuple[str, str]:
    """(key, extension) the webdataset way: the extension starts at the first dot of the basename."""
    d, base = os.path.split(name)
    stem, dot, ext = base.partition(".")
    return (os.path.join(d, stem) if d else stem), ext.lower()


class WebDatasetSource(Source):
    """A folder of webdataset `.tar` shards (img2dataset's layout), read by member offsets."""

    name = "webdataset"

    def __init__(self, root, num: int | None = None):
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"webdataset folder {self.root} does not exist")
        self.root = self.root.resolve()  # the same listing from any working directory
        self.tars = sorted(p for p in self.root.rglob("*.tar") if p.is_file())
        if not self.tars:
            raise FileNotFoundError(f"no .tar files in {self.root}")
        self.num = num

    def _tar_refs(self, tar_path: Path) -> list:
        groups: dict[str, dict] = {}
        refs = []
        try:
            with tarfile.open(tar_path, "r:") as tf:
                for m in tf:
                    if not m.isfile():
                        continue
                    key, ext = _split_member_name(m.name)
                    slot = ("image" if "." + ext in IMAGE_EXTENSIONS else
                            "txt" if ext == "txt" else "json" if ext == "json" else None)
                    if slot is not None:
                        groups.setdefault(key, {})[slot] = (m.name, m.offset_data, m.size)
        except (tarfile.TarError, OSError) as e:
            # The members listed before the damage are whole and kept; the rest is one skip.
            refs.append(TarRef(str(tar_path), "<rest of tar>", None, None, None,
                               f"tar is corrupt or truncated here, later members lost: {e}"))
        return [TarRef(str(tar_path), key, g.get("image"), g.get("txt"), g.get("json"))
                for key, g in groups.items()] + refs

    def refs(self) -> list:
        out = []
        for tar_path in self.tars:
            out.extend(self._tar_refs(tar_path))
            if self.num is not None and len(out) >= self.num:
                return out[: self.num]
        return out

    @staticmethod
    def _member(f, member) -> bytes:
        _, offset, size = member
        f.seek(offset)
        data = f.read(size)
        if len(data) != size:
            raise OSError(f"member {member[0]} is truncated")
        return data

    def read(self, ref: TarRef):
        path = f"{ref.tar}:{ref.key}"
        if ref.error is not None:
            raise SkipItem(path, ref.error)
        if ref.image is None:
            raise SkipItem(path, "no image member (.jpg, .png, .webp) for this key")
        try:
            with open(ref.tar, "rb") as f:
                raw = self._member(f, ref.image)
                caption = None
                if ref.txt is not None:
                    caption = self._member(f, ref.txt).decode("utf-8", errors="strict")
                if (caption is None or not caption.strip()) and ref.json is not None:
                    meta = json.loads(self._member(f, ref.json))
                    caption = next((meta[k] for k in CAPTION_KEYS if isinstance(meta, dict) and meta.get(k)), caption)
        except (OSError, ValueError) as e:
            raise SkipItem(path, f"cannot read tar member: {e}") from None
        return ref.key, f"{ref.tar}:{ref.image[0]}", raw, caption

    def describe(self):
        return {"kind": self.name, "root": str(self.root), "num": self.num,
                "tars": [str(p.relative_to(self.root)) for p in self.tars]}


def open_source(spec, *, num: int | None = None, seed: int = 0) -> Source:
    """The source named by `spec`: "shapes", an image folder, a .jsonl/.csv manifest, or a folder of .tar shards."""
    if isinstance(spec, Source):
        return spec
    if str(spec) == "shapes" or str(spec).startswith("shapes:"):
        return ShapesSource(num if num is not None else 1000, seed, shapes_options(str(spec)))
    path = Path(spec)
    if not path.exists():
        raise FileNotFoundError(f"source {spec!r} is neither 'shapes' nor an existing path")
    if path.is_file():
        return ManifestSource(path, num)
    if any(path.glob("*.tar")) and not any(p.suffix.lower() in IMAGE_EXTENSIONS for p in path.iterdir()):
        return WebDatasetSource(path, num)
    return FolderSource(path, num)
