"""Latent shards: safetensors files of stacked per-sample tensors, plus a dataset `index.json`.

Why safetensors: users already have tools for it (`safetensors.safe_open`, `load_file` in torch,
numpy, JAX, the Hugging Face hub viewer), it needs no new dependency (the model checkpoints use
it already), its layout (an 8-byte length, a JSON header, raw little-endian arrays) is
memory-mappable so a loader reads one sample without reading the shard, and it is
framework-neutral. MDS and webdataset tars pack samples one by one, which suits streaming
images from object storage but makes each latent a separate decode; here a batch is one fancy
index into a mapped array.

Layout of a dataset folder:

    index.json              format, version, encoder metadata, resolutions, per-sample shapes and
                            dtypes, counts, and per-shard file, samples, bytes and sha256
    shard-00000.safetensors tensors `latents_{R}` (N, C, h, w) per resolution R,
                            `caption_states` (N, L, Cy), `caption_mask` (N, L) BOOL; header
                            metadata: `keys` and `captions` (JSON lists), `skipped` (JSON list
                            of {"path", "reason"}), `source_range` ("[start, stop]")
    summary.json            what the last `microdit prepare` run did (counts, skips, timing)

Latents and caption states are stored in one dtype (float16 by default, as the published
MicroDiT precompute does; bfloat16 and float32 possible) and read back as float32. Files are
written by this module's own serializer, not `safetensors.save_file`, because that one writes
header metadata in hash order, which would make identical shards differ byte for byte; the
files remain standard safetensors (tested with the safetensors library). Every write is atomic:
a temporary file, fsync, rename, fsync of the folder.
"""
from __future__ import annotations

import hashlib
import json
import mmap
import os
import struct
import threading
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .. import files
from ..files import atomic_path

TMP_MARK = files.TMP_MARK  # in every temporary file's name: what sweeps of leftovers look for

FORMAT = "microdit-latent-shards"
VERSION = 1
INDEX = "index.json"
SHARD_PATTERN = "shard-{:05d}.safetensors"

STORAGE_DTYPES = {"float16": "F16", "bfloat16": "BF16", "float32": "F32"}
# safetensors dtype -> numpy dtype it is mapped as; BF16 is mapped as raw uint16 (numpy has no bf16).
_NUMPY = {"F16": np.float16, "BF16": np.uint16, "F32": np.float32, "BOOL": np.bool_, "U8": np.uint8,
          "I64": np.int64, "I32": np.int32}
_CHUNK = 1 << 20


class ShardError(Exception):
    """A dataset folder or shard that is missing, incomplete, incompatible or corrupt."""


class ChecksumError(ShardError):
    """A shard whose bytes do not match the sha256 recorded in index.json."""


def atomic_write_bytes(path, chunks) -> str:
    """Write the byte `chunks` to `path` atomically (temp file, fsync, rename); returns their sha256."""
    digest = hashlib.sha256()
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        for chunk in chunks:
            digest.update(chunk)
            f.write(chunk)
    return digest.hexdigest()


def atomic_write_json(path, obj) -> None:
    """Write `obj` as indented JSON to `path` atomically."""
    atomic_write_bytes(path, [json.dumps(obj, indent=2, sort_keys=False).encode() + b"\n"])


def storage_code(dtype: str) -> str:
    """The safetensors dtype code of a storage dtype name; a clear error for others."""
    if dtype not in STORAGE_DTYPES:
        raise ValueError(f"storage dtype {dtype!r} not supported (supported: {', '.join(STORAGE_DTYPES)})")
    return STORAGE_DTYPES[dtype]


def _as_bytes(t: torch.Tensor) -> tuple[str, memoryview]:
    """(safetensors dtype code, little-endian raw bytes) of a CPU tensor."""
    t = t.detach().cpu().contiguous()
    code = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32", torch.bool: "BOOL",
            torch.uint8: "U8", torch.int64: "I64", torch.int32: "I32"}.get(t.dtype)
    if code is None:
        raise TypeError(f"cannot store dtype {t.dtype} in a shard")
    arr = (t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy()
    return code, memoryview(np.ascontiguousarray(arr).reshape(-1).view(np.uint8))


def write_shard(path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> tuple[str, int]:
    """Write a safetensors file with deterministic bytes, atomically; returns (sha256, size)."""
    raw = {name: _as_bytes(t) for name, t in tensors.items()}
    # Widest dtypes first keep every array aligned to its item size without padding holes.
    order = sorted(raw, key=lambda n: (-np.dtype(_NUMPY[raw[n][0]]).itemsize, n))
    header: dict = {"__metadata__": {k: metadata[k] for k in sorted(metadata)}}
    offset = 0
    for name in order:
        code, buf = raw[name]
        header[name] = {"dtype": code, "shape": list(tensors[name].shape),
                        "data_offsets": [offset, offset + buf.nbytes]}
        offset += buf.nbytes
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)  # the reference serializer pads the header to 8 bytes
    chunks = [struct.pack("<Q", len(text)), text] + [raw[n][1] for n in order]
    sha = atomic_write_bytes(path, chunks)
    return sha, 8 + len(text) + offset


def read_header(path) -> tuple[dict, dict, int]:
    """(tensor entries, metadata, data start) of a safetensors file; ShardError if unreadable."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > 100_000_000:
                raise ValueError(f"header length {n} is implausible")
            header = json.loads(f.read(n))
            size = os.fstat(f.fileno()).st_size
    except (OSError, ValueError, struct.error) as e:
        raise ShardError(f"shard {path} is unreadable: {e}") from None
    meta = header.pop("__metadata__", {}) or {}
    end = max((e["data_offsets"][1] for e in header.values()), default=0)
    if 8 + n + end != size:
        raise ShardError(f"shard {path} is truncated or padded: {size} bytes, header says {8 + n + end}")
    return header, meta, 8 + n


def shard_metadata(path) -> dict:
    """The JSON-decoded header metadata of a shard (keys, captions, skipped, source_range)."""
    _, meta, _ = read_header(path)
    out = {}
    for k, v in meta.items():
        try:
            out[k] = json.loads(v)
        except ValueError:
            out[k] = v
    return out


def file_sha256(path) -> str:
    """sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def read_json(path) -> dict:
    """A JSON index file; ShardError naming it if it is not valid JSON."""
    try:
        return json.loads(Path(path).read_text())
    except ValueError as e:
        raise ShardError(f"{path} is not valid JSON: {e}") from None


def read_index(root) -> dict:
    """The dataset index of `root`, with clear errors for a missing, unfinished or foreign folder."""
    root = Path(root)
    if not root.is_dir():
        raise ShardError(f"dataset folder {root} does not exist")
    path = root / INDEX
    if not path.is_file():
        partial = any(root.glob("shard-*.safetensors"))
        hint = ("it holds shards but no index: `microdit prepare` did not finish; rerun it to complete the dataset"
                if partial else "make one with `microdit prepare SOURCE OUT`")
        raise ShardError(f"{root} is not a microdit shard dataset (no {INDEX}): {hint}")
    index = read_json(path)
    if index.get("format") != FORMAT:
        raise ShardError(f"{path} has format {index.get('format')!r}, expected {FORMAT!r}")
    if index.get("version") != VERSION:
        raise ShardError(f"{path} is format version {index.get('version')}, this microdit reads version {VERSION}")
    return index


def _to_float32(arr: np.ndarray, code: str) -> torch.Tensor:
    """A float32 tensor from stored values (BF16 arrives as raw uint16)."""
    t = torch.from_numpy(np.ascontiguousarray(arr))
    if code == "BF16":
        t = t.view(torch.bfloat16)
    # copy_ into a fresh float32 tensor runs the conversion in parallel; .float() does not.
    return torch.empty(t.shape, dtype=torch.float32).copy_(t)


class ShardVerifier:
    """sha256 of every shard of a dataset, in a background thread, so that hashing a large dataset
    overlaps training instead of delaying it.

    `require(shards)` returns once those shards are verified, hashing any not yet started in the
    calling thread (so the first batch waits only for its own shards), and raises the first
    ChecksumError found so far by anyone, so corrupt data is reported before any batch from it
    is trained on, and as soon as it is found.
    """

    _PENDING, _RUNNING, _DONE = 0, 1, 2

    def __init__(self, dataset: "ShardDataset", background: bool = True):
        self.dataset = dataset
        n = len(dataset.shards)
        self._state = [self._PENDING] * n
        self._errors: dict[int, ShardError] = {}
        self._cv = threading.Condition()
        self._thread = None
        if background and n:
            self._thread = threading.Thread(target=self._run, name="microdit-shard-sha256", daemon=True)
            self._thread.start()

    def _claim(self, j: int) -> bool:
        with self._cv:
            if self._state[j] != self._PENDING:
                return False
            self._state[j] = self._RUNNING
            return True

    def _hash(self, j: int) -> None:
        error = None
        try:
            self.dataset.verify_shard(j)
        except (ShardError, OSError) as e:
            error = e if isinstance(e, ShardError) else ShardError(f"shard {self.dataset.shards[j]['file']}: {e}")
        with self._cv:
            self._state[j] = self._DONE
            if error is not None:
                self._errors[j] = error
            self._cv.notify_all()

    def _run(self) -> None:
        for j in range(len(self._state)):
            if self._errors:
                return
            if self._claim(j):
                self._hash(j)

    def require(self, shards) -> None:
        """Block until `shards` are verified; ChecksumError for the first bad shard found so far."""
        shards = list(shards)
        for j in shards:
            if self._claim(j):
                self._hash(j)
        with self._cv:
            self._cv.wait_for(lambda: all(self._state[j] == self._DONE for j in shards) or bool(self._errors))
            if self._errors:
                raise self._errors[min(self._errors)]

    @property
    def done(self) -> bool:
        """Whether every shard has been verified."""
        with self._cv:
            return all(st == self._DONE for st in self._state)


class ShardDataset:
    """Random access to a prepared dataset: item i -> latents, caption states/mask, caption, key."""

    def __init__(self, root, resolution: int | None = None, verify: bool = False):
        self.root = Path(root)
        self.metadata = read_index(self.root)
        resolutions = list(self.metadata["resolutions"])
        if resolution is None:
            if len(resolutions) != 1:
                raise ShardError(f"{self.root} holds resolutions {resolutions}: pass resolution= one of them")
            resolution = resolutions[0]
        if resolution not in resolutions:
            raise ShardError(f"{self.root} has no resolution {resolution} (it holds {resolutions})")
        self.resolution = int(resolution)
        self.latents_name = f"latents_{self.resolution}"
        self.shards = list(self.metadata["shards"])
        counts = [int(s["samples"]) for s in self.shards]
        self.offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        if int(self.offsets[-1]) != int(self.metadata["num_samples"]):
            raise ShardError(f"{self.root}/{INDEX} is inconsistent: shard counts sum to "
                             f"{int(self.offsets[-1])}, num_samples is {self.metadata['num_samples']}")
        missing = [s["file"] for s in self.shards if not (self.root / s["file"]).is_file()]
        if missing:
            raise ShardError(f"{self.root} is missing shard files: {', '.join(missing[:5])}"
                             + (" ..." if len(missing) > 5 else ""))
        self._open: dict[int, dict] = {}
        self._captions: list[str] | None = None
        self._keys: list[str] | None = None
        self._check_headers()
        if verify:
            self.verify()

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __repr__(self) -> str:
        return (f"ShardDataset({str(self.root)!r}, resolution={self.resolution}, samples={len(self)}, "
                f"shards={len(self.shards)})")

    def __getstate__(self):
        # Memory maps are per process: a DataLoader worker opens its own.
        state = self.__dict__.copy()
        state["_open"] = {}
        return state

    def _check_headers(self) -> None:
        """The cheap checks, always run on open: each shard's size, tensors, per-sample shapes and dtypes,
        and its sample, key and caption counts against index.json (headers only, no tensor data read).

        A shard holding more samples than the index says would be read past its end; one holding
        fewer would silently drop samples and misalign keys and captions."""
        specs = self.metadata["tensors"]
        captions, keys = [], []
        for s in self.shards:
            path, n = self.root / s["file"], int(s["samples"])
            header, meta, _ = read_header(path)
            if "bytes" in s and os.path.getsize(path) != int(s["bytes"]):
                raise ShardError(f"shard {path} has {os.path.getsize(path)} bytes, index.json records {s['bytes']}; "
                                 "re-create it with `microdit prepare`")
            for name in (self.latents_name, "caption_states", "caption_mask"):
                e = header.get(name)
                if e is None:
                    raise ShardError(f"shard {path} has no tensor {name!r}")
                want = [n] + list(specs[name]["shape"]) if name in specs else None
                if want is not None and (list(e["shape"]) != want or e["dtype"] != specs[name]["dtype"]):
                    raise ShardError(f"shard {path}: tensor {name!r} is {e['dtype']} {list(e['shape'])}, index.json "
                                     f"records {n} samples of {specs[name]['dtype']} {list(specs[name]['shape'])}; "
                                     "re-create it with `microdit prepare`")
            texts = {}
            for field in ("captions", "keys"):
                try:
                    texts[field] = json.loads(meta.get(field, "[]"))
                except ValueError:
                    raise ShardError(f"shard {path}: its {field} metadata is not valid JSON") from None
                if len(texts[field]) != n:
                    raise ShardError(f"shard {path} holds {len(texts[field])} {field}, index.json records {n} "
                                     "samples; re-create it with `microdit prepare`")
            captions.extend(texts["captions"])
            keys.extend(texts["keys"])
        self._captions, self._keys = captions, keys

    def verify_shard(self, j: int) -> None:
        """Check shard j's sha256 against index.json; ChecksumError names the shard."""
        s = self.shards[j]
        actual = file_sha256(self.root / s["file"])
        if actual != s["sha256"]:
            raise ChecksumError(f"shard {self.root / s['file']} fails its checksum: sha256 {actual}, "
                                f"index.json records {s['sha256']}; re-create it with `microdit prepare`")

    def verify(self) -> None:
        """Check every shard's sha256 against index.json; ChecksumError names the first bad one."""
        for j in range(len(self.shards)):
            self.verify_shard(j)

    def shards_of(self, indices) -> list[int]:
        """The shards that hold samples `indices`."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1) % max(len(self), 1)
        return np.unique(np.searchsorted(self.offsets, idx, side="right") - 1).tolist()

    def _shard(self, j: int) -> dict:
        """name -> (memory-mapped storage array, dtype code) of shard j, opened once per process."""
        arrays = self._open.get(j)
        if arrays is None:
            path = self.root / self.shards[j]["file"]
            header, _, start = read_header(path)
            with open(path, "rb") as f:
                # Plain arrays over one mmap: np.memmap's subclass costs more per fancy index.
                mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if os.fstat(f.fileno()).st_size else b""
            arrays = {}
            for name in (self.latents_name, "caption_states", "caption_mask"):
                if name not in header:
                    raise ShardError(f"shard {path} has no tensor {name!r}")
                e = header[name]
                dtype, shape = np.dtype(_NUMPY[e["dtype"]]), tuple(e["shape"])
                arr = np.frombuffer(mm, dtype=dtype, count=int(np.prod(shape)),
                                    offset=start + e["data_offsets"][0]).reshape(shape)
                arrays[name] = (arr, e["dtype"])
            self._open[j] = arrays
        return arrays

    def _texts(self) -> tuple[list[str], list[str]]:
        if self._captions is None:
            captions, keys = [], []
            for s in self.shards:
                meta = shard_metadata(self.root / s["file"])
                captions.extend(meta["captions"])
                keys.extend(meta["keys"])
            self._captions, self._keys = captions, keys
        return self._captions, self._keys

    @property
    def captions(self) -> list[str]:
        """Every caption, in sample order."""
        return self._texts()[0]

    @property
    def keys(self) -> list[str]:
        """Every sample key, in sample order."""
        return self._texts()[1]

    def gather(self, indices) -> dict[str, np.ndarray]:
        """Stored arrays (storage dtype; BF16 as uint16) of samples `indices`, stacked in that order."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        n = len(self)
        if idx.size and (idx.min() < -n or idx.max() >= n):
            raise IndexError(f"sample index out of range for {n} samples")
        idx = idx % max(n, 1)
        shard_of = np.searchsorted(self.offsets, idx, side="right") - 1
        out: dict[str, np.ndarray] = {}
        for j in np.unique(shard_of):
            arrays = self._shard(int(j))
            where = np.nonzero(shard_of == j)[0]
            local = idx[where] - self.offsets[j]
            for name, (arr, _) in arrays.items():
                if name not in out:
                    out[name] = np.empty((idx.size,) + arr.shape[1:], arr.dtype)
                out[name][where] = arr[local]
        if not out:  # an empty request still has the right shapes
            for name, spec in self.tensor_specs().items():
                out[name] = np.empty((0,) + tuple(spec["shape"]), _NUMPY[spec["dtype"]])
        return out

    def tensor_specs(self) -> dict:
        """name -> {"shape": per-sample shape, "dtype": safetensors code} of what this reader returns."""
        t = self.metadata["tensors"]
        return {self.latents_name: t[self.latents_name], "caption_states": t["caption_states"],
                "caption_mask": t["caption_mask"]}

    def to_batch(self, arrays: dict[str, np.ndarray], indices) -> dict:
        """Float32/bool tensors (and captions, keys, index) from `gather`'s arrays."""
        specs = self.tensor_specs()
        captions, keys = self._texts()
        idx = [int(i) % max(len(self), 1) for i in np.asarray(indices).reshape(-1)]
        return {
            "latents": _to_float32(arrays[self.latents_name], specs[self.latents_name]["dtype"]),
            "caption_states": _to_float32(arrays["caption_states"], specs["caption_states"]["dtype"]),
            "caption_mask": torch.from_numpy(np.ascontiguousarray(arrays["caption_mask"])).bool(),
            "captions": [captions[i] for i in idx],
            "keys": [keys[i] for i in idx],
            "index": torch.as_tensor(idx, dtype=torch.int64),
        }

    def get_batch(self, indices: Sequence[int]) -> dict:
        """Samples `indices` stacked: latents (B,C,h,w), caption_states (B,L,Cy) float32, caption_mask (B,L) bool, captions, keys, index."""
        return self.to_batch(self.gather(indices), indices)

    def __getitem__(self, i: int) -> dict:
        if not -len(self) <= i < len(self):
            raise IndexError(f"sample {i} out of range for {len(self)} samples")
        b = self.get_batch([i])
        return {"latents": b["latents"][0], "caption_states": b["caption_states"][0],
                "caption_mask": b["caption_mask"][0], "caption": b["captions"][0], "key": b["keys"][0]}

    def codec(self):
        """The image codec these latents were made with (to decode them), from the recorded metadata."""
        from .codecs import codec_from_metadata

        return codec_from_metadata(self.metadata["codec"])

    def text_encoder(self):
        """The text encoder these caption states were made with, from the recorded metadata."""
        from .text_encoders import text_encoder_from_metadata

        return text_encoder_from_metadata(self.metadata["text_encoder"])
