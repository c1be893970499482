"""Images for evaluation, generated once across ranks, resumable, and reused by every metric.

`ImageStore` is a folder: `images/NNNNNN.png` (caption index, zero-padded), one manifest per
rank (`manifest.rank<R>.jsonl`: index, caption id, caption, file, sha256, appended after the
PNG is in place), and `settings.json`, which pins what the images were made with; a folder made
with other settings is refused rather than mixed. An interrupted run continues with the images
that are missing: every image is a function of (seed, caption index) alone, so the split over
ranks, the batching and the interruption do not change any of them.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path

import numpy as np

SETTINGS = "settings.json"


class ImageStoreError(ValueError):
    pass


class ImageStore:
    def __init__(self, root, settings: dict):
        self.root = Path(root)
        self.images_dir = self.root / "images"
        self.settings = json.loads(json.dumps(settings, sort_keys=True))
        self._appending: set[int] = set()  # ranks whose manifest this process has checked for a torn line
        path = self.root / SETTINGS
        if path.exists():
            old = json.loads(path.read_text())
            if old != self.settings:
                diff = sorted(k for k in set(old) | set(self.settings) if old.get(k) != self.settings.get(k))
                raise ImageStoreError(f"{self.root}: images there were made with other settings ({', '.join(diff)} "
                                      "differ); use another --out, or delete the folder to start again")

    def create(self) -> None:
        """Make the folder and pin its settings (one process: rank 0)."""
        self.images_dir.mkdir(parents=True, exist_ok=True)
        path = self.root / SETTINGS
        if not path.exists():
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.settings, indent=2, sort_keys=True))
            os.replace(tmp, path)

    def records(self) -> dict[int, dict]:
        """Finished images by caption index, from every rank's manifest (a torn last line is ignored)."""
        out = {}
        for manifest in sorted(self.root.glob("manifest.rank*.jsonl")):
            for line in manifest.read_text().splitlines():
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue  # the line a killed process was writing
                if (self.images_dir / rec["file"]).is_file():
                    out[int(rec["index"])] = rec
        return out

    def write(self, rank: int, index: int, caption_id, caption: str, image: np.ndarray) -> dict:
        """Save one PNG atomically, then record it in this rank's manifest (flushed to disk)."""
        from PIL import Image

        buf = io.BytesIO()
        Image.fromarray(image).save(buf, format="PNG")
        data = buf.getvalue()
        name = f"{index:06d}.png"
        tmp = self.images_dir / f".{name}.tmp"
        tmp.write_bytes(data)
        os.replace(tmp, self.images_dir / name)
        rec = {"index": index, "id": caption_id, "caption": caption, "file": name,
               "sha256": hashlib.sha256(data).hexdigest()}
        manifest = self.root / f"manifest.rank{rank}.jsonl"
        torn = False
        if rank not in self._appending:
            # A killed run may have left a torn last line: start on a fresh line, or this record joins it.
            self._appending.add(rank)
            if manifest.is_file() and manifest.stat().st_size:
                with open(manifest, "rb") as f:
                    f.seek(-1, os.SEEK_END)
                    torn = f.read(1) != b"\n"
        with open(manifest, "a") as f:
            f.write(("\n" if torn else "") + json.dumps(rec) + "\n")
            f.flush()
            os.fsync(f.fileno())
        return rec

    def batches(self, count: int, batch_size: int = 256):
        """(indices, uint8 (B, H, W, 3) images) for images 0..count-1 in caption order, read from the files
        a batch at a time (30K images at 512 px do not fit in memory); an error names the first missing one."""
        from PIL import Image

        recs = self.records()
        missing = [i for i in range(count) if i not in recs]
        if missing:
            raise ImageStoreError(f"{self.root}: {len(missing)} of {count} images missing (first: {missing[0]}); "
                                  "run the same command again to make them")
        for s in range(0, count, batch_size):
            idx = list(range(s, min(count, s + batch_size)))
            yield idx, np.stack([np.asarray(Image.open(self.images_dir / recs[i]["file"]).convert("RGB")) for i in idx])


def generate_missing(pipe, captions: list[tuple[str, str]], store: ImageStore, *, steps: int, guidance: float,
                     seed: int, batch_size: int, info, progress: bool = True) -> dict:
    """Make the images `store` lacks, split over the ranks of `info` (a DistInfo); every rank returns counts.

    Image i is `pipe`'s image 0 of caption i with noise from (seed, i): the same image whatever the
    rank count, batch size or interruption.
    """
    from ..train import distributed
    from ..train.metrics import ProgressBar

    if info.is_main:
        store.create()
    distributed.barrier(info)
    done = store.records()
    distributed.barrier(info)  # every rank has read the same finished set before any rank adds to it
    todo = [i for i in range(len(captions)) if i not in done]
    mine = todo[info.rank::info.world_size]
    texts = [text for _, text in captions]
    # The bar counts this rank's images (rank 0 shows it); the ETA is the whole run's, ranks move together.
    bar = ProgressBar(len(mine), enabled=progress and info.is_main)
    made = 0
    for start in range(0, len(mine), batch_size):
        chunk = mine[start:start + batch_size]
        images = pipe.images(texts, jobs=[(i, 0) for i in chunk], steps=steps, guidance=guidance, seed=seed,
                             batch_size=batch_size)
        for i, image in zip(chunk, images):
            store.write(info.rank, i, captions[i][0], captions[i][1], image)
        made += len(chunk)
        bar.update(made, images_total=len(todo), reused=len(done))
    bar.close()
    distributed.barrier(info)
    return {"total": len(captions), "reused": len(done), "generated": len(todo)}
