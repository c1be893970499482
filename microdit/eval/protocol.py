"""A pinned evaluation protocol: captions, reference set and resizing, sampler, image size, metric models.

`run_protocol` generates the images once (across ranks, resumable: microdit.eval.generate),
computes the protocol's metrics from those files, and writes `report.json` and `report.md`
recording every choice, the checkpoint's sha256 and the elapsed time. The built-in protocols
are `coco30k` (the paper's COCO FID-30K, as far as it is known: see the README) and `shapes`
(ShapesEval prompts for models trained on the built-in shapes data, the offline default).
"""
from __future__ import annotations

import copy
import csv
import hashlib
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch

from .fid import Statistics, file_sha256

log = logging.getLogger("microdit.eval")

DEFAULTS = {
    "name": "custom",
    "captions": {"file": None, "count": None, "select": "first", "select_seed": 0},
    "image_size": None,  # None: the model's resolution; otherwise images are resized to it for the metrics
    "reference": {"path": None, "resize": "center_crop_bicubic", "max_images": None},
    "sampler": {"steps": 30, "guidance": 5.0, "seed": 0, "seed_rule": "noise of caption i: "
                "torch.Generator().manual_seed(seed * 1000003 + i * 1009)", "batch_size": 16, "ema": False},
    "metrics": {"fid": True, "kid": False, "kid_subset_size": 1000, "kid_subsets": 100, "kid_seed": 2020,
                "inception": None, "clip": False, "clip_model": "openai/clip-vit-large-patch14",
                "shapes_eval": False},
}

BUILTIN = {
    # COCO FID-30K: 30,000 captions drawn (seed 0) from COCO 2014 val captions, one per image, 256 px
    # images against the val images centre-cropped and resized to 256; sampler as the published
    # sampling code (30 Heun steps, guidance 5). The paper does not pin the caption draw, the
    # reference size or the FID implementation; these are our choices (README, Evaluation).
    "coco30k": {"name": "coco30k", "captions": {"count": 30000, "select": "random_one_per_image", "select_seed": 0},
                "image_size": 256, "reference": {"resize": "center_crop_bicubic"},
                "sampler": {"steps": 30, "guidance": 5.0, "seed": 0},
                "metrics": {"fid": True, "kid": True, "clip": True, "clip_model": "openai/clip-vit-large-patch14"}},
    # ShapesEval prompts for models trained on the built-in shapes data: offline, no metric models.
    "shapes": {"name": "shapes", "captions": {"file": "shapes_eval:120:0"},
               "sampler": {"steps": 30, "guidance": 5.0, "seed": 0},
               "metrics": {"fid": False, "kid": False, "clip": False, "shapes_eval": True}},
}


class ProtocolError(ValueError):
    pass


def _merge(base: dict, over: dict, where: str) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if k not in out:
            raise ProtocolError(f"{where}: unknown key {k!r} (known: {', '.join(out)})")
        if isinstance(out[k], dict):
            if not isinstance(v, dict):
                raise ProtocolError(f"{where}.{k}: expected a mapping, got {v!r}")
            out[k] = _merge(out[k], v, f"{where}.{k}")
        else:
            out[k] = v
    return out


def load_protocol(spec: str, overrides: dict | None = None) -> dict:
    """A built-in protocol by name, or a YAML/JSON file (which may name a built-in as `base`), then overrides."""
    if spec in BUILTIN:
        values, where = BUILTIN[spec], f"protocol {spec}"
    else:
        path = Path(spec)
        if not path.is_file():
            raise ProtocolError(f"protocol {spec!r}: not a built-in ({', '.join(BUILTIN)}) nor a file")
        import yaml

        values = yaml.safe_load(path.read_text()) if path.suffix in (".yaml", ".yml") else json.loads(path.read_text())
        if not isinstance(values, dict):
            raise ProtocolError(f"{path}: a protocol file holds a mapping")
        where = str(path)
        if "base" in values:
            values = dict(values)
            base = values.pop("base")
            if base not in BUILTIN:
                raise ProtocolError(f"{path}: base {base!r} is not a built-in protocol ({', '.join(BUILTIN)})")
            values = _merge(_merge(DEFAULTS, BUILTIN[base], base), values, where)
    proto = _merge(DEFAULTS, values, where)
    proto = _merge(proto, overrides or {}, "overrides")
    _validate(proto)
    return proto


def _validate(p: dict) -> None:
    s, m = p["sampler"], p["metrics"]
    if not (isinstance(s["steps"], int) and s["steps"] >= 1):
        raise ProtocolError(f"sampler.steps must be an integer >= 1, got {s['steps']!r}")
    if p["captions"]["select"] not in ("first", "random", "random_one_per_image"):
        raise ProtocolError(f"captions.select must be first, random or random_one_per_image; got {p['captions']['select']!r}")
    if p["reference"]["resize"] not in ("center_crop_bicubic",):
        raise ProtocolError(f"reference.resize must be center_crop_bicubic; got {p['reference']['resize']!r}")
    if not any(m[k] for k in ("fid", "kid", "clip", "shapes_eval")):
        raise ProtocolError("the protocol computes no metric (metrics.fid, kid, clip and shapes_eval are all false)")


def protocol_hash(p: dict) -> str:
    return hashlib.sha256(json.dumps(p, sort_keys=True).encode()).hexdigest()


# ------------------------------------------------------------------------------------ captions

def read_captions(spec: str) -> tuple[list[tuple[str, str, str]], str]:
    """[(caption id, text, image id)] and the file's sha256, from .jsonl/.json (COCO annotations too),
    .csv or .txt; `shapes_eval:N:SEED` gives ShapesEval's prompts."""
    if spec.startswith("shapes_eval:"):
        from .shapes_eval import eval_prompts

        _, n, seed = spec.split(":")
        rows = [(str(i), p.prompt, str(i)) for i, p in enumerate(eval_prompts(int(n), int(seed)))]
        return rows, hashlib.sha256(json.dumps(rows).encode()).hexdigest()
    path = Path(spec)
    if not path.is_file():
        raise FileNotFoundError(f"captions file {spec!r}: no such file")
    text = path.read_text()
    if path.suffix == ".txt":
        rows = [(str(i), line.strip(), str(i)) for i, line in enumerate(text.splitlines()) if line.strip()]
    elif path.suffix == ".csv":
        rows = [_row(r, path, n) for n, r in enumerate(csv.DictReader(text.splitlines()))]
    elif path.suffix == ".jsonl":
        rows = [_row(json.loads(line), path, n) for n, line in enumerate(text.splitlines()) if line.strip()]
    elif path.suffix == ".json":
        data = json.loads(text)
        items = data["annotations"] if isinstance(data, dict) and "annotations" in data else data
        if not isinstance(items, list):
            raise ProtocolError(f"{path}: expected a list of captions or COCO's {{'annotations': [...]}}")
        rows = [_row(r, path, n) for n, r in enumerate(items)]
    else:
        raise ProtocolError(f"captions file {path}: use .jsonl, .json, .csv or .txt")
    if not rows:
        raise ProtocolError(f"captions file {path}: no captions")
    return rows, file_sha256(path)


def _row(r: dict, path: Path, n: int) -> tuple[str, str, str]:
    text = r.get("caption", r.get("text"))
    if not isinstance(text, str) or not text.strip():
        raise ProtocolError(f"{path}: entry {n} has no caption/text")
    cid = str(r.get("id", n))
    return cid, " ".join(text.split()), str(r.get("image_id", cid))


def select_captions(rows, count, select: str, seed: int):
    if count is None or count >= len(rows) and select == "first":
        return list(rows) if count is None else list(rows[:count])
    if select == "first":
        return list(rows[:count])
    if select == "random_one_per_image":
        first = {}
        for r in rows:
            first.setdefault(r[2], r)  # COCO has ~5 captions an image: keep the first of each
        rows = list(first.values())
    if count > len(rows):
        raise ProtocolError(f"captions.count {count} is more than the {len(rows)} captions available")
    idx = np.sort(np.random.default_rng(seed).choice(len(rows), count, replace=False))
    return [rows[i] for i in idx]


# ------------------------------------------------------------------------------------ images

def resize_images(images: np.ndarray, size: int | None) -> np.ndarray:
    """Centre-crop to a square and bicubic-resize to `size` (PIL), as `microdit prepare` does; as is when it fits."""
    from PIL import Image

    from ..data.sources import center_crop_resize

    if size is None or images.shape[1:3] == (size, size):
        return images
    return np.stack([center_crop_resize(Image.fromarray(im), size) for im in images])


_IMAGE_EXT = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}


def reference_images(source: Path, size: int | None, max_images: int | None, batch: int = 256):
    """Batches of uint8 reference images from an image folder (recursive, sorted) or prepared shards."""
    from PIL import Image

    from ..data.sources import center_crop_resize, to_rgb

    if (source / "index.json").is_file():
        import torch

        from ..data.shards import ShardDataset

        ds = ShardDataset(source)
        codec = ds.codec()
        n = len(ds) if max_images is None else min(len(ds), max_images)
        for s in range(0, n, batch):
            lat = torch.as_tensor(ds.get_batch(list(range(s, min(n, s + batch))))["latents"])
            yield resize_images(codec.decode(lat).cpu().numpy(), size)
        return
    files = sorted(p for p in source.rglob("*") if p.suffix.lower() in _IMAGE_EXT and p.is_file())
    if max_images is not None:
        files = files[:max_images]
    if not files:
        raise ProtocolError(f"reference {source}: no images (png/jpg/webp) and no shards (index.json)")
    for s in range(0, len(files), batch):
        out = []
        for f in files[s:s + batch]:
            with Image.open(f) as im:
                im = to_rgb(im)
                out.append(np.asarray(im, np.uint8) if size is None and im.size[0] == im.size[1]
                           else center_crop_resize(im, size or min(im.size)))
        yield np.stack(out)


def _listing_fingerprint(source: Path) -> str:
    h = hashlib.sha256()
    if (source / "index.json").is_file():
        h.update((source / "index.json").read_bytes())
    else:
        for p in sorted(source.rglob("*")):
            if p.suffix.lower() in _IMAGE_EXT and p.is_file():
                st = p.stat()
                h.update(f"{p.relative_to(source)}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def reference_statistics(spec, proto: dict, extractor, image_size: int | None, cache_dir: Path) -> Statistics:
    """Reference Inception statistics: an .npz, or computed once from a folder/shards and cached as
    `cache_dir/ref-<hash>.npz`, the hash covering the protocol's reference settings, the image
    size, the Inception weights and the folder's listing."""
    ref = proto["reference"]
    want = {"inception_sha256": extractor.sha256, "image_size": image_size, "resize": ref["resize"]}
    path = Path(spec)
    if path.suffix == ".npz":
        stats = Statistics.load(path)
        bad = {k: (stats.meta.get(k), v) for k, v in want.items() if stats.meta.get(k) != v}
        if bad:
            raise ProtocolError(f"reference {path} was made with other settings: "
                                + "; ".join(f"{k} {a!r} there, {b!r} here" for k, (a, b) in bad.items()))
        return stats
    if not path.is_dir():
        raise FileNotFoundError(f"reference {spec!r}: not an .npz, an image folder or a shards folder")
    meta = {**want, "source": str(path.resolve()), "listing_sha256": _listing_fingerprint(path),
            "max_images": ref["max_images"], "extractor": extractor.metadata()}
    key = protocol_hash({k: v for k, v in meta.items() if k != "extractor"})
    meta["key"] = key
    cached = Path(cache_dir) / f"ref-{key[:16]}.npz"
    if cached.is_file():
        log.info("reference statistics from the cache: %s", cached)
        return Statistics.load(cached)
    feats = np.concatenate([extractor(b) for b in reference_images(path, image_size, ref["max_images"])])
    stats = Statistics.of(feats, keep_features=True, meta=meta)
    stats.save(cached)
    log.info("reference statistics of %d images cached in %s", len(feats), cached)
    return stats


# ------------------------------------------------------------------------------------ running

def checkpoint_sha256(source) -> tuple[str, str]:
    """(the file hashed, its sha256): a checkpoint file, a run's latest checkpoint, or a folder's weights."""
    path = Path(source)
    if path.is_dir():
        from ..models.pretrained import is_pretrained_dir

        if not is_pretrained_dir(path):
            from ..train.checkpoint import resolve_checkpoint

            path = resolve_checkpoint(path)
        else:
            h = hashlib.sha256()
            for f in sorted(p for p in path.rglob("*") if p.is_file()):
                h.update(f"{f.relative_to(path)}:{file_sha256(f)}\n".encode())
            return str(path), h.hexdigest()
    return str(path), file_sha256(path)


def run_protocol(checkpoint, proto: dict, out, *, captions_file=None, reference=None, device="cpu",
                 cache_dir=None, info=None, progress: bool = True) -> dict | None:
    """Generate (resumably, over the ranks of `info`), score and report; the report dict on rank 0."""
    from ..pipeline import MicroDiTPipeline
    from ..train import distributed
    from .generate import ImageStore, generate_missing

    info = info or distributed.DistInfo(device=torch.device(device))
    t0 = time.perf_counter()
    out = Path(out)
    cap = proto["captions"]
    cap_spec = captions_file or cap["file"]
    if not cap_spec:
        raise ProtocolError(f"protocol {proto['name']}: no captions file (pass --captions FILE)")
    rows, cap_sha = read_captions(str(cap_spec))
    rows = select_captions(rows, cap["count"], cap["select"], cap["select_seed"])
    m, s = proto["metrics"], proto["sampler"]
    ref_spec = reference or proto["reference"]["path"]
    if (m["fid"] or m["kid"]) and not ref_spec:
        raise ProtocolError(f"protocol {proto['name']}: FID/KID need a reference (pass --reference DIR_OR_NPZ)")

    ckpt_file, ckpt_sha = checkpoint_sha256(checkpoint)
    pipe = MicroDiTPipeline.load(checkpoint, ema=s["ema"], device=info.device, dtype="float32")
    # What the images depend on (not the metrics): another metric set reuses the same images.
    settings = {"checkpoint_sha256": ckpt_sha, "captions_sha256": cap_sha, "captions": cap, "count": len(rows),
                "sampler": {k: s[k] for k in ("steps", "guidance", "seed", "ema")}}
    store = ImageStore(out, settings)
    counts = generate_missing(pipe, [(r[0], r[1]) for r in rows], store, steps=s["steps"], guidance=s["guidance"],
                              seed=s["seed"], batch_size=s["batch_size"], info=info, progress=progress)
    if not info.is_main:
        return None
    gen_s = time.perf_counter() - t0
    size = proto["image_size"]
    texts = [r[1] for r in rows]
    results, models = {}, {}
    ex = scorer = None
    if m["fid"] or m["kid"]:
        from .fid import InceptionFeatures

        ex = InceptionFeatures(m["inception"], device=info.device)
        models["inception"] = ex.metadata()
    if m["clip"]:
        from .clip_score import CLIPScorer

        scorer = CLIPScorer(m["clip_model"], device=info.device)
        models["clip"] = scorer.metadata()
    # One pass over the image files feeds every metric.
    feats, per_clip, all_images, resolution = [], [], [], None
    for idx, images in store.batches(len(rows)):
        resolution = int(images.shape[1])
        scored = resize_images(images, size)
        if ex is not None:
            feats.append(ex(scored))
        if scorer is not None:
            per_clip.append(scorer.scores(scored, [texts[i] for i in idx]))
        if m["shapes_eval"]:
            all_images.append(images)
    if ex is not None:
        from .fid import fid, kid

        ref = reference_statistics(ref_spec, proto, ex, size, Path(cache_dir or out / "cache"))
        gen = Statistics.of(np.concatenate(feats))
        models["reference"] = {"source": str(ref_spec), "count": ref.count, "key": ref.meta.get("key"),
                               "image_size": size, "resize": proto["reference"]["resize"]}
        if m["fid"]:
            results["fid"] = fid(gen, ref)
        if m["kid"]:
            if ref.features is None:
                raise ProtocolError(f"reference {ref_spec}: its .npz holds no features, which KID needs")
            sub = min(m["kid_subset_size"], gen.count, ref.count)
            results["kid_mean"], results["kid_std"] = kid(gen.features, ref.features, subsets=m["kid_subsets"],
                                                          subset_size=sub, seed=m["kid_seed"])
            results["kid_subset_size"] = sub
    if scorer is not None:
        from .clip_score import clip_score

        results["clip_score"] = clip_score(np.concatenate(per_clip))
    if m["shapes_eval"]:
        from .shapes_eval import ShapesEval

        scores = ShapesEval().score(np.concatenate(all_images), texts)
        results["shapes_eval"] = {k: v for k, v in scores.items() if k != "details"}
    report = {
        "protocol": proto, "protocol_hash": protocol_hash(proto),
        "checkpoint": str(checkpoint), "checkpoint_file": ckpt_file, "checkpoint_sha256": ckpt_sha,
        "captions": {"source": str(cap_spec), "sha256": cap_sha, "count": len(rows),
                     "ids_sha256": hashlib.sha256("\n".join(r[0] for r in rows).encode()).hexdigest()},
        "images": {"dir": str(store.images_dir), "resolution": resolution, "scored_at": size or resolution, **counts},
        "metric_models": models, "metrics": results,
        "elapsed_s": {"generation": round(gen_s, 3), "total": round(time.perf_counter() - t0, 3)},
        "world_size": info.world_size, "device": str(info.device),
    }
    (out / "report.json").write_text(json.dumps(report, indent=2))
    (out / "report.md").write_text(report_markdown(report))
    return report


def report_markdown(r: dict) -> str:
    p = r["protocol"]
    lines = [f"# Evaluation: protocol `{p['name']}`", "",
             f"- checkpoint: `{r['checkpoint_file']}` (sha256 `{r['checkpoint_sha256']}`)",
             f"- protocol hash: `{r['protocol_hash']}`",
             f"- captions: {r['captions']['count']} from `{r['captions']['source']}` (sha256 `{r['captions']['sha256']}`, "
             f"selection {p['captions']['select']}, seed {p['captions']['select_seed']})",
             f"- sampler: {p['sampler']['steps']} Heun steps, guidance {p['sampler']['guidance']}, seed {p['sampler']['seed']} "
             f"({p['sampler']['seed_rule']}), {'EMA' if p['sampler']['ema'] else 'raw'} weights",
             f"- images: {r['images']['total']} at {r['images']['resolution']} px, scored at {r['images']['scored_at']} px "
             f"({r['images']['generated']} generated this run, {r['images']['reused']} reused) in `{r['images']['dir']}`",
             f"- reference: {json.dumps(r['metric_models'].get('reference')) if 'reference' in r['metric_models'] else 'none'}",
             f"- metric models: {json.dumps({k: v for k, v in r['metric_models'].items() if k != 'reference'})}",
             f"- elapsed: {r['elapsed_s']['total']:.1f} s (generation {r['elapsed_s']['generation']:.1f} s) on "
             f"{r['world_size']} x {r['device']}", "", "| metric | value |", "|---|---:|"]
    for k, v in r["metrics"].items():
        if isinstance(v, dict):
            lines += [f"| {k}.{kk} | {vv:.4f} |" for kk, vv in v.items() if isinstance(vv, float)]
        else:
            lines.append(f"| {k} | {v:.6g} |")
    return "\n".join(lines) + "\n"
