"""The published MicroDiT latents (MosaicML MDS shards) as training data, read in place.

The published precompute scripts write, per dataset, MDS shards with the columns

    caption            str      (optional here)
    caption_latents    bytes    float16 text-encoder states, 77 x 1024 (DFN5B CLIP), row-major
    latents_256        bytes    float16 VAE latents (C, 32, 32), already multiplied by scaling_factor
    latents_512        bytes    float16 VAE latents (C, 64, 64)

one folder per writer process (`0/`, `1/`, ...) and a merged `index.json` whose shard names
carry that folder. This module reads that layout directly, without `streaming`: `index.json`
(version 2) lists each shard's `raw_data` file, sample count, byte size and column names,
encodings and fixed sizes; a shard file is

    uint32 n | uint32 offsets[n + 1] (from the file start) | the writer's JSON config | samples

and a sample is one uint32 size per variable-size column, then every column's bytes in the
index's column order. A folder without a top-level index.json is read as the concatenation of
its sub-folders' indexes, sorted by name.

`MDSDataset` is a `ShardDataset` (same `gather` / `to_batch` / `get_batch`), so `ShardLoader`,
and with it the seeded epochs, rank-disjoint batches and exact resume of `BatchPlan`, work on
it unchanged. Latent channels come from the byte counts (the published VAEs downsample by 8);
the caption mask is all True (the published states are a causal CLIP's, every position its
own state, and carry no mask); the recorded encoders are the published ones for the channel
count. Compressed shards (zip_data only) are not read: decompress them first.
"""
from __future__ import annotations

import json
import mmap
import os
from pathlib import Path

import numpy as np

from .shards import INDEX, ShardDataset, ShardError, read_json

MDS_VERSION = 2
DOWNSAMPLE = 8  # the SDXL and Ostris VAEs of the published latents
CAPTION_SHAPE = (77, 1024)
# The encoders the published latents were made with (micro_diffusion's precompute defaults).
_TEXT = {"kind": "openclip", "name": "openclip:hf-hub:apple/DFN5B-CLIP-ViT-H-14-378",
         "spec": "openclip:hf-hub:apple/DFN5B-CLIP-ViT-H-14-378", "dim": 1024, "max_length": 77,
         "dtype": "bfloat16", "padding_states": "model"}
_CODECS = {
    4: {"spec": "stabilityai/stable-diffusion-xl-base-1.0", "subfolder": "vae"},
    16: {"spec": "ostris/vae-kl-f8-d16", "subfolder": None},
}


def is_mds_folder(root) -> bool:
    """Whether `root` holds MDS shards: an MDS index.json, or sub-folders that each have one."""
    root = Path(root)
    if (root / INDEX).is_file():
        return _is_mds_index(root / INDEX)
    subs = sorted(p for p in root.iterdir() if (p / INDEX).is_file()) if root.is_dir() else []
    return bool(subs) and all(_is_mds_index(p / INDEX) for p in subs)


def _is_mds_index(path: Path) -> bool:
    try:
        index = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    shards = index.get("shards") if isinstance(index, dict) else None
    return isinstance(shards, list) and bool(shards) and all(
        isinstance(s, dict) and s.get("format") == "mds" for s in shards)


def read_mds_index(root) -> list[dict]:
    """Every shard entry of `root` (file path relative to root, samples, bytes, columns), in order."""
    root = Path(root)
    if (root / INDEX).is_file():
        indexes = [(root / INDEX, "")]
    else:
        indexes = [(p / INDEX, p.name + "/") for p in sorted(root.iterdir()) if (p / INDEX).is_file()]
    if not indexes:
        raise ShardError(f"{root} is not an MDS dataset: no {INDEX} in it or in its sub-folders")
    out = []
    for path, prefix in indexes:
        index = read_json(path)
        if index.get("version") != MDS_VERSION:
            raise ShardError(f"{path} is MDS index version {index.get('version')}, this reader reads {MDS_VERSION}")
        for s in index["shards"]:
            raw = s.get("raw_data") or {}
            if not raw.get("basename"):
                zipped = (s.get("zip_data") or {}).get("basename")
                raise ShardError(f"{path}: shard {zipped!r} is stored compressed ({s.get('compression')}) only; "
                                 "decompress the shards (or rewrite them with compression=None) to read them in place")
            out.append({"file": prefix + raw["basename"], "samples": int(s["samples"]), "bytes": int(raw["bytes"]),
                        "column_names": list(s["column_names"]), "column_encodings": list(s["column_encodings"]),
                        "column_sizes": list(s["column_sizes"]), "index": str(path)})
    return out


class _Column:
    """A fixed-size bytes column of one mapped shard, viewed as (n, *shape) of `dtype` without copying it all."""

    def __init__(self, buf: np.ndarray, starts: np.ndarray, shape: tuple, dtype):
        self.buf, self.starts, self.dtype = buf, starts, np.dtype(dtype)
        self.shape = (len(starts), *shape)
        self._span = np.arange(int(np.prod(shape)) * self.dtype.itemsize)

    def __getitem__(self, idx) -> np.ndarray:
        starts = self.starts[np.asarray(idx, dtype=np.int64).reshape(-1)]
        raw = self.buf[starts[:, None] + self._span]  # (k, nbytes) uint8: one fancy-index copy
        return raw.view(self.dtype).reshape((len(starts), *self.shape[1:]))


class _Full:
    """An all-True caption mask column."""

    def __init__(self, n: int, length: int):
        self.shape, self.dtype = (n, length), np.dtype(np.bool_)

    def __getitem__(self, idx) -> np.ndarray:
        return np.ones((np.asarray(idx).size, self.shape[1]), dtype=np.bool_)


class _Captions:
    """Captions read lazily from their shards (a terabyte dataset's captions are never all loaded)."""

    def __init__(self, ds: "MDSDataset"):
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> str:
        j = int(np.searchsorted(self.ds.offsets, i, side="right") - 1)
        return self.ds._caption(j, i - int(self.ds.offsets[j]))


class _Keys(_Captions):
    def __getitem__(self, i: int) -> str:
        j = int(np.searchsorted(self.ds.offsets, i, side="right") - 1)
        return f"{self.ds.shards[j]['file']}:{i - int(self.ds.offsets[j])}"


class MDSDataset(ShardDataset):
    """Random access to published-layout MDS shards: the ShardDataset interface (see module doc)."""

    def __init__(self, root, resolution: int | None = None, verify: bool = False, *,
                 caption_key: str = "caption", caption_shape: tuple[int, int] = CAPTION_SHAPE):
        self.root = Path(root)
        self.shards = read_mds_index(self.root)
        self.caption_key, self.caption_shape = caption_key, tuple(caption_shape)
        resolutions = sorted({int(c.removeprefix("latents_")) for s in self.shards for c in s["column_names"]
                              if c.startswith("latents_") and c.removeprefix("latents_").isdigit()})
        if resolution is None:
            if len(resolutions) != 1:
                raise ShardError(f"{self.root} holds latents for resolutions {resolutions}: pass resolution= "
                                 "(data.resolution=) one of them")
            resolution = resolutions[0]
        self.resolution = int(resolution)
        self.latents_name = f"latents_{self.resolution}"
        self.states_name = f"{caption_key}_latents"
        for s in self.shards:
            self._check_entry(s)
        self.offsets = np.concatenate([[0], np.cumsum([s["samples"] for s in self.shards])]).astype(np.int64)
        self._open: dict[int, dict] = {}
        self._layouts: dict[int, tuple] = {}  # shard -> (bytes, column starts and sizes), with _open
        self._captions, self._keys = _Captions(self), _Keys(self)
        channels = self._shard(0)[self.latents_name][0].shape[1] if len(self) else 0
        self.metadata = self._describe(channels)
        if verify:
            self.verify()

    def __repr__(self) -> str:
        return (f"MDSDataset({str(self.root)!r}, resolution={self.resolution}, samples={len(self)}, "
                f"shards={len(self.shards)})")

    def _check_entry(self, s: dict) -> None:
        """Columns present and of the right kind, the file there and of the size the index says: at once."""
        path = self.root / s["file"]
        cols = dict(zip(s["column_names"], s["column_encodings"]))
        for name in (self.latents_name, self.states_name):
            if name not in cols:
                raise ShardError(f"MDS shard {path} has no column {name!r} (its columns: {', '.join(sorted(cols))}; "
                                 f"listed in {s['index']})")
            if cols[name] != "bytes":
                raise ShardError(f"MDS shard {path}: column {name!r} is encoded {cols[name]!r}, expected 'bytes' "
                                 "(float16 arrays, as the published precompute writes)")
        if not path.is_file():
            raise ShardError(f"MDS shard {path} is missing (listed in {s['index']})")
        size = path.stat().st_size
        if size != s["bytes"]:
            raise ShardError(f"MDS shard {path} is truncated or altered: {size} bytes, {s['index']} says {s['bytes']}")

    def _describe(self, channels: int) -> dict:
        """index-like metadata: the published encoders for this channel count, and the tensor specs."""
        g = self.resolution // DOWNSAMPLE
        codec = {"kind": "autoencoder_kl", "channels": channels, "downsample": DOWNSAMPLE, "sample": True,
                 "dtype": "bfloat16", "shift_factor": 0.0, **_CODECS.get(channels, {"spec": None, "subfolder": None})}
        codec["name"] = f"vae:{codec['spec']}" + (f"/{codec['subfolder']}" if codec["subfolder"] else "")
        return {"format": "mds", "resolutions": [self.resolution], "num_samples": len(self), "codec": codec,
                "text_encoder": dict(_TEXT, dim=self.caption_shape[1], max_length=self.caption_shape[0]),
                "tensors": {self.latents_name: {"shape": [channels, g, g], "dtype": "F16"},
                            "caption_states": {"shape": list(self.caption_shape), "dtype": "F16"},
                            "caption_mask": {"shape": [self.caption_shape[0]], "dtype": "BOOL"}}}

    def verify(self) -> None:
        """Read every shard's header and sample table (MDS keeps no checksums unless asked to)."""
        for j in range(len(self.shards)):
            self._shard(j)

    def _layout(self, j: int):
        """(uint8 view of shard j, {column: (starts, sizes)}), checking the shard's own header."""
        s = self.shards[j]
        path = self.root / s["file"]
        with open(path, "rb") as f:
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if os.fstat(f.fileno()).st_size else b""
        buf = np.frombuffer(mm, dtype=np.uint8)
        n = s["samples"]
        if buf.size < 4 * (n + 2) or int(buf[:4].view(np.uint32)[0]) != n:
            raise ShardError(f"MDS shard {path} is truncated or not an MDS shard: its header does not hold the "
                             f"{n} samples {s['index']} lists")
        offsets = buf[4:4 * (n + 2)].view(np.uint32).astype(np.int64)
        if offsets[-1] != buf.size or np.any(np.diff(offsets) < 0):
            raise ShardError(f"MDS shard {path} is truncated: its sample table ends at byte {offsets[-1]}, "
                             f"the file has {buf.size}")
        sizes_fixed = s["column_sizes"]
        var = [c for c, z in zip(s["column_names"], sizes_fixed) if z is None]
        starts = offsets[:-1] + 4 * len(var)
        if var:  # each sample begins with one uint32 size per variable column
            heads = buf[offsets[:-1, None] + np.arange(4 * len(var))].reshape(n, len(var), 4).copy()
            var_sizes = heads.view(np.uint32).reshape(n, len(var)).astype(np.int64)
        layout, v = {}, 0
        for name, fixed in zip(s["column_names"], sizes_fixed):
            if fixed is None:
                size = var_sizes[:, v]
                v += 1
            else:
                size = np.full(n, int(fixed), dtype=np.int64)
            layout[name] = (starts.copy(), size)
            starts = starts + size
        if np.any(starts != offsets[1:]):
            bad = int(np.nonzero(starts != offsets[1:])[0][0])
            raise ShardError(f"MDS shard {path}: sample {bad}'s columns do not fill its bytes; the shard is corrupt")
        return buf, layout

    def _shard(self, j: int) -> dict:
        """name -> (column view, safetensors dtype code) of shard j, opened once per process."""
        arrays = self._open.get(j)
        if arrays is None:
            buf, layout = self._layout(j)
            path = self.root / self.shards[j]["file"]
            g = self.resolution // DOWNSAMPLE
            starts, size = layout[self.latents_name]
            per = 2 * g * g  # float16 bytes per channel
            if len(size) and (size[0] % per or np.any(size != size[0])):
                raise ShardError(f"MDS shard {path}: column {self.latents_name!r} holds {int(size[0])} bytes per "
                                 f"sample, not float16 (C, {g}, {g}) latents of one size")
            channels = int(size[0]) // per if len(size) else 0
            latents = _Column(buf, starts, (channels, g, g), np.float16)
            starts, size = layout[self.states_name]
            want = 2 * int(np.prod(self.caption_shape))
            if np.any(size != want):
                raise ShardError(f"MDS shard {path}: column {self.states_name!r} holds {int(size[0])} bytes per "
                                 f"sample, expected float16 {self.caption_shape[0]} x {self.caption_shape[1]} "
                                 f"({want} bytes); pass caption_shape= for another text encoder")
            arrays = {self.latents_name: (latents, "F16"),
                      "caption_states": (_Column(buf, starts, self.caption_shape, np.float16), "F16"),
                      "caption_mask": (_Full(len(starts), self.caption_shape[0]), "BOOL")}
            self._open[j] = arrays
            self._layouts[j] = (buf, layout)
        return arrays

    def _caption(self, j: int, local: int) -> str:
        self._shard(j)
        buf, layout = self._layouts[j]
        if self.caption_key not in layout:
            return ""
        starts, sizes = layout[self.caption_key]
        return bytes(buf[starts[local]:starts[local] + sizes[local]]).decode("utf-8")

    def __getstate__(self):
        state = super().__getstate__()
        state["_layouts"] = {}  # memory maps are per process
        return state

    def _texts(self):
        return self._captions, self._keys
