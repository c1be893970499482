"""`microdit prepare`: a source of captioned images -> latent shards (see `microdit.data.shards`).

Source item k always lands in shard k // shard_size (bad items are left out of it and recorded
in its header), and each shard is encoded in fixed batches on one device, so a shard's bytes
depend only on the settings and the source: an interrupted run is resumed by keeping the shards
already written (each one appeared atomically) and redoing the rest, giving the same files as
one clean run, and a rerun of a finished dataset does nothing. The settings that decide the
contents (source, resolutions, encoders, dtype, shard size, minimum size) are recorded in
`OUT/prepare.json`; running into OUT with different ones is refused. Decoding and resizing run
in a pool of worker processes while the main process encodes.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import multiprocessing as mp
import os
import sys
import time
from collections import deque
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..progress import Progress
from . import shards as S
from .sources import Item, SkipItem, Source, default_min_size, open_source

log = logging.getLogger(__name__)

SETTINGS = "prepare.json"
SUMMARY = "summary.json"
LOCK = ".prepare.lock"
DEFAULT_SHARD_SIZE = 1000
TASK_SIZE = 16  # items per worker task: large enough to amortise pickling, small enough to balance


class PrepareError(Exception):
    """`prepare` cannot run as asked (e.g. OUT was made with other settings)."""


def default_workers() -> int:
    """Decode workers: the cores minus one for the encoding process, at most 8."""
    return max(0, min(8, (os.cpu_count() or 1) - 1))


def _load_task(source: Source, refs: list, resolutions: tuple, min_size: int) -> list:
    """Items (or (path, reason) skips) of `refs`; runs in a worker process."""
    out = []
    for ref in refs:
        try:
            out.append(source.load(ref, resolutions, min_size))
        except SkipItem as e:
            out.append((e.path, e.reason))
        except Exception as e:  # a bug in one item's reader must not lose the rest of the run
            out.append((repr(ref)[:200], f"unexpected error: {type(e).__name__}: {e}"))
    return out


@contextlib.contextmanager
def _exclusive(out: Path):
    """Refuse two prepare runs writing one folder at once (the lock dies with its process)."""
    import fcntl

    with open(out / LOCK, "a") as f:
        try:
            # A POSIX record lock, not flock: forked decode workers do not inherit it, so a
            # killed run's lock is gone with its main process.
            fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise PrepareError(f"another `microdit prepare` is writing {out}") from None
        yield


def _diff(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Human-readable differences between two settings dicts."""
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _diff(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}: {a!r} there, {b!r} now")
    return out


def _check_settings(out: Path, settings: dict) -> dict:
    """The recorded settings of OUT (written now if new); PrepareError if they differ from `settings`."""
    path = out / SETTINGS
    if path.is_file():
        recorded = json.loads(path.read_text())
        base = {k: v for k, v in recorded.items() if k not in ("codec", "text_encoder")}
        diff = _diff(base, settings)
        if diff:
            raise PrepareError(f"{out} was prepared with other settings; use a new OUT folder or the same "
                               f"settings. Differences: " + "; ".join(diff))
        return recorded
    if any(out.glob("shard-*.safetensors")) or (out / S.INDEX).exists():
        raise PrepareError(f"{out} holds shards but no {SETTINGS}: it was not made by this `microdit prepare`")
    S.atomic_write_json(path, settings)
    return dict(settings)


def _check_encoders(out: Path, recorded: dict, encoders: dict) -> None:
    """Record the encoders' metadata on the first run; refuse a different model under the same name."""
    if "codec" in recorded:
        diff = _diff({k: recorded[k] for k in encoders}, encoders)
        if diff:
            raise PrepareError(f"{out} was prepared with other encoders (same names, different models). "
                               f"Differences: " + "; ".join(diff))
        return
    recorded.update(encoders)
    S.atomic_write_json(out / SETTINGS, recorded)


def _finished_shard(path: Path, start: int, stop: int) -> dict | None:
    """The header metadata of a finished shard covering source items [start, stop), else None."""
    if not path.is_file():
        return None
    try:
        meta = S.shard_metadata(path)
    except S.ShardError as e:
        log.warning("redoing %s: %s", path, e)
        return None
    if meta.get("source_range") != [start, stop]:
        log.warning("redoing %s: it covers source items %s, expected %s", path, meta.get("source_range"),
                    [start, stop])
        return None
    return meta


def _pad_states(states: torch.Tensor, mask: torch.Tensor, length: int, name: str) -> tuple:
    """Caption states and mask padded (zeros, False) to the encoder's fixed `length`."""
    n, l, _ = states.shape
    if l > length:
        raise PrepareError(f"text encoder {name} returned {l} tokens, more than its max_length {length}")
    if l < length:
        states = torch.nn.functional.pad(states, (0, 0, 0, length - l))
        mask = torch.nn.functional.pad(mask, (0, length - l), value=False)
    return states, mask


def _encode_shard(items: list[Item], resolutions, codec, text_encoder, batch_size: int, dtype) -> dict:
    """The shard tensors of `items`, encoded in fixed batches of `batch_size`."""
    latents = {r: [] for r in resolutions}
    states, masks = [], []
    with torch.inference_mode():
        for b in range(0, len(items), batch_size):
            chunk = items[b:b + batch_size]
            for r in resolutions:
                pixels = torch.from_numpy(np.stack([it.images[r] for it in chunk]))  # (N, R, R, 3) uint8
                latents[r].append(codec.encode(pixels).float().cpu().to(dtype))
            s, m = text_encoder.encode([it.caption for it in chunk])
            s, m = _pad_states(s.float().cpu(), m.bool().cpu(), text_encoder.max_length, text_encoder.name)
            states.append(s.to(dtype))
            masks.append(m)
    out = {}
    for r in resolutions:
        h = r // codec.downsample
        out[f"latents_{r}"] = (torch.cat(latents[r]) if latents[r] else
                               torch.zeros(0, codec.channels, h, h, dtype=dtype))
    out["caption_states"] = (torch.cat(states) if states else
                             torch.zeros(0, text_encoder.max_length, text_encoder.dim, dtype=dtype))
    out["caption_mask"] = torch.cat(masks) if masks else torch.zeros(0, text_encoder.max_length, dtype=torch.bool)
    return out


def _worker_init(parent: int) -> None:
    """Make a decode worker die with its parent (a kill -9 of prepare must not leave orphans)."""
    if sys.platform == "linux":
        import ctypes
        import signal

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the parent died before the line above
        os._exit(1)


def _pool_context():
    # fork starts workers in milliseconds; they only run PIL/numpy, and are started before any
    # model is loaded, so no torch thread pool is forked. Elsewhere spawn.
    if sys.platform == "linux" and "fork" in mp.get_all_start_methods():
        return mp.get_context("fork")
    return mp.get_context("spawn")


def _results(source, todo, ranges, resolutions, min_size, workers):
    """(shard j, its items and skips in order) for each shard in `todo`, decoded by the pool."""
    tasks = [(j, refs[i:i + TASK_SIZE]) for j in todo for refs in [ranges[j]]
             for i in range(0, len(refs), TASK_SIZE)]
    if workers == 0:
        for j in todo:
            yield j, _load_task(source, ranges[j], resolutions, min_size)
        return
    with _pool_context().Pool(workers, initializer=_worker_init, initargs=(os.getpid(),)) as pool:
        pending: deque = deque()
        current, acc = None, []
        window = 4 * workers
        it = iter(tasks)
        while True:
            while len(pending) < window:
                nxt = next(it, None)
                if nxt is None:
                    break
                pending.append((nxt[0], pool.apply_async(_load_task, (source, nxt[1], resolutions, min_size))))
            if not pending:
                break
            j, fut = pending.popleft()
            if current is not None and j != current:
                yield current, acc
                acc = []
            current = j
            acc.extend(fut.get())
        if current is not None:
            yield current, acc


def prepare(source, out, resolutions: Sequence[int] | None = None, codec="pixels",
            text_encoder="minilm", num: int | None = None, seed: int = 0,
            shard_size: int = DEFAULT_SHARD_SIZE, workers: int | None = None, batch_size: int = 64,
            device=None, progress: bool = True, dtype: str = "float16", min_size: int | None = None) -> dict:
    """Encode `source` into latent shards in `out`, resuming any earlier run; returns the summary.

    `source`: "shapes", a path, or a `Source`; `codec` / `text_encoder`: spec strings for
    `encoders.get_codec` / `get_text_encoder`, or encoder objects.
    """
    t0 = time.perf_counter()
    src = open_source(source, num=num, seed=seed)
    if resolutions is None:
        resolutions = (32,) if src.name == "shapes" else (256,)
    resolutions = tuple(sorted({int(r) for r in resolutions}))
    if not resolutions or min(resolutions) < 1:
        raise ValueError(f"resolutions must be positive, got {resolutions}")
    if shard_size < 1 or batch_size < 1:
        raise ValueError("shard_size and batch_size must be >= 1")
    code = S.storage_code(dtype)
    storage = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[dtype]
    min_size = default_min_size(resolutions) if min_size is None else int(min_size)
    workers = default_workers() if workers is None else int(workers)
    out = Path(out)
    refs = src.refs()
    if not refs:
        raise PrepareError(f"source {source} holds no images (found nothing to prepare: {src.describe()}); "
                           "point it at a folder of images with captions, a manifest or webdataset tars")
    out.mkdir(parents=True, exist_ok=True)
    # The listing decides which item lands in which shard: a folder that gained or lost files
    # since the first run must not be resumed into shards made from the old listing.
    digest = hashlib.sha256()
    for ref in refs:
        digest.update(repr(ref).encode() + b"\n")
    listing = digest.hexdigest()
    settings = {"format": S.FORMAT, "version": S.VERSION,
                "source": {**src.describe(), "items": len(refs), "listing_sha256": listing},
                "resolutions": list(resolutions), "codec_spec": _spec(codec),
                "text_encoder_spec": _spec(text_encoder), "dtype": dtype, "shard_size": shard_size,
                "min_size": min_size}
    with _exclusive(out):
        recorded = _check_settings(out, settings)
        for stale in out.glob(f"*{S.TMP_MARK}*"):  # left by a killed run; never a finished file
            stale.unlink(missing_ok=True)
        n_shards = math.ceil(len(refs) / shard_size)
        ranges = [refs[j * shard_size:(j + 1) * shard_size] for j in range(n_shards)]
        paths = [out / S.SHARD_PATTERN.format(j) for j in range(n_shards)]
        metas = {}
        for j in range(n_shards):
            meta = _finished_shard(paths[j], j * shard_size, j * shard_size + len(ranges[j]))
            if meta is not None:
                metas[j] = meta
        todo = [j for j in range(n_shards) if j not in metas]
        resumed = len(metas)
        shas: dict[int, tuple[str, int]] = {}
        items_done = sum(len(ranges[j]) for j in metas)
        bar = Progress(len(refs), desc="prepare", unit="img", initial=items_done, enabled=progress and bool(todo))
        try:
            if todo:
                results = _results(src, todo, ranges, resolutions, min_size, workers)
                # Started before the encoders load, so forked workers carry no model.
                first = next(results)
                from .codecs import get_codec
                from .text_encoders import get_text_encoder

                cod = get_codec(codec) if isinstance(codec, str) else codec
                te = get_text_encoder(text_encoder) if isinstance(text_encoder, str) else text_encoder
                if device is not None:
                    cod, te = cod.to(device), te.to(device)
                _check_encoders(out, recorded, {"codec": cod.metadata(), "text_encoder": te.metadata()})
                for j, loaded in _chain(first, results):
                    items = [x for x in loaded if isinstance(x, Item)]
                    skipped = [{"path": x[0], "reason": x[1]} for x in loaded if not isinstance(x, Item)]
                    tensors = _encode_shard(items, resolutions, cod, te, batch_size, storage)
                    meta = {"format": S.FORMAT, "version": str(S.VERSION),
                            "keys": json.dumps([it.key for it in items], ensure_ascii=False),
                            "captions": json.dumps([it.caption for it in items], ensure_ascii=False),
                            "skipped": json.dumps(skipped, ensure_ascii=False),
                            "source_range": json.dumps([j * shard_size, j * shard_size + len(ranges[j])])}
                    shas[j] = S.write_shard(paths[j], tensors, meta)
                    metas[j] = S.shard_metadata(paths[j])
                    bar.update(len(ranges[j]))
        finally:
            bar.close()
        if not any(metas[j]["keys"] for j in range(n_shards)):
            reasons = [x["reason"] for j in range(n_shards) for x in metas[j]["skipped"]][:3]
            raise PrepareError(f"source {source}: none of its {len(refs)} items is usable, all were skipped "
                               f"(first reasons: {'; '.join(reasons)}); no dataset was written to {out}")
        index = _write_index(out, recorded, resolutions, paths, metas, shas, code)
    skipped_items = [s for j in range(n_shards) for s in metas[j]["skipped"]]
    seconds = time.perf_counter() - t0
    done_now = sum(len(ranges[j]) for j in todo)
    summary = {
        "out": str(out), "source": src.describe(), "resolutions": list(resolutions),
        "written": index["num_samples"], "skipped": len(skipped_items), "skipped_items": skipped_items,
        "shards": n_shards, "shards_written": len(todo), "shards_resumed": resumed,
        "items_this_run": done_now, "seconds": round(seconds, 3),
        "items_per_s": round(done_now / seconds, 2) if done_now else 0.0,
        "workers": workers, "batch_size": batch_size, "device": str(device or "cpu"),
    }
    S.atomic_write_json(out / SUMMARY, summary)
    return summary


def _spec(encoder) -> str:
    """How an encoder given by spec string or as an object is recorded."""
    return encoder if isinstance(encoder, str) else f"<object {encoder.name}>"


def _chain(first, rest):
    yield first
    yield from rest


def _write_index(out: Path, recorded: dict, resolutions, paths, metas, shas, code) -> dict:
    """index.json from the shard headers; sha256 from this run's writes, else recomputed."""
    shards, tensors = [], None
    for j, path in enumerate(paths):
        header, _, _ = S.read_header(path)
        spec = {name: {"shape": e["shape"][1:], "dtype": e["dtype"]} for name, e in sorted(header.items())}
        if tensors is None:
            tensors = spec
        elif spec != tensors:
            raise S.ShardError(f"shard {path} holds {spec}, other shards hold {tensors}")
        sha, size = shas.get(j) or (S.file_sha256(path), path.stat().st_size)
        shards.append({"file": path.name, "samples": len(metas[j]["keys"]), "skipped": len(metas[j]["skipped"]),
                       "bytes": size, "sha256": sha})
    index = {
        "format": S.FORMAT, "version": S.VERSION,
        "codec": recorded.get("codec"), "text_encoder": recorded.get("text_encoder"),
        "resolutions": list(resolutions), "dtype": recorded["dtype"], "storage_dtype": code,
        "tensors": tensors or {},
        "num_samples": sum(s["samples"] for s in shards), "num_skipped": sum(s["skipped"] for s in shards),
        "shard_size": recorded["shard_size"], "shards": shards,
        "settings": {k: v for k, v in recorded.items() if k not in ("codec", "text_encoder")},
    }
    old = out / S.INDEX
    if not (old.is_file() and json.loads(old.read_text()) == index):  # a finished rerun changes nothing
        S.atomic_write_json(old, index)
    return index


def _cmd_prepare(args) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        summary = prepare(args.source, args.out, resolutions=args.resolution, codec=args.codec,
                          text_encoder=args.text_encoder, num=args.num, seed=args.seed,
                          shard_size=args.shard_size, workers=args.workers, batch_size=args.batch_size,
                          device=args.device, progress=not args.no_progress, dtype=args.dtype,
                          min_size=args.min_size)
    except (PrepareError, S.ShardError, FileNotFoundError, ValueError) as e:
        print(f"microdit prepare: error: {e}", file=sys.stderr)
        return 2
    for s in summary["skipped_items"][:20]:
        print(f"skipped {s['path']}: {s['reason']}", file=sys.stderr)
    if summary["skipped"] > 20:
        print(f"... and {summary['skipped'] - 20} more (see {Path(args.out) / SUMMARY})", file=sys.stderr)
    brief = {k: summary[k] for k in ("out", "written", "skipped", "shards", "shards_written",
                                      "shards_resumed", "seconds", "items_per_s")}
    print(json.dumps(brief))
    return 0


def add_parser(subparsers) -> None:
    """Register `microdit prepare`."""
    p = subparsers.add_parser(
        "prepare", help="encode a source of captioned images into latent shards",
        description="Encode SOURCE (`shapes`, an image folder with .txt captions, a .jsonl/.csv manifest, "
                    "or a folder of webdataset .tar shards) into latent shards in OUT. Resumable: rerun "
                    "the same command after an interruption.")
    p.add_argument("source", help="`shapes`, an image folder, a .jsonl/.csv manifest, or a folder of .tar shards")
    p.add_argument("out", help="output folder (created; rerun into it to resume)")
    p.add_argument("--resolution", type=int, action="append", default=None, metavar="R",
                   help="image side in pixels; repeat for several (default 32 for shapes, else 256)")
    p.add_argument("--codec", default="pixels", help="`pixels`, `pixels:F`, or a diffusers AutoencoderKL path or hub id")
    p.add_argument("--text-encoder", default="minilm", help="`minilm`, `openclip:...`, or a Hugging Face path or hub id")
    p.add_argument("--num", type=int, default=None, help="number of items (shapes: how many to make, default 1000; else the first N)")
    p.add_argument("--seed", type=int, default=0, help="shapes seed")
    p.add_argument("--shard-size", type=int, default=DEFAULT_SHARD_SIZE, help="source items per shard")
    p.add_argument("--workers", type=int, default=None, help="decode worker processes (default: cores - 1, at most 8)")
    p.add_argument("--batch-size", type=int, default=64, help="encoder batch size")
    p.add_argument("--device", default=None, help="encoder device (default cpu; cpu makes shards reproducible bit for bit)")
    p.add_argument("--dtype", default="float16", choices=sorted(S.STORAGE_DTYPES), help="storage dtype of latents and caption states")
    p.add_argument("--min-size", type=int, default=None, help="skip images whose short side is smaller (default: half the largest resolution)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(fn=_cmd_prepare)
