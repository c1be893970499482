"""Training batches from latent shards: seeded shuffling, rank and worker sharding, caption dropout, exact resume.

The batch sequence is a pure function of (seed, epoch, batch): epoch e is the permutation
`default_rng([seed, e]).permutation(N)`; rank r takes every world_size-th sample of it (disjoint
across ranks), cut to the same length on every rank so no rank waits at a collective; its
batches are consecutive runs of batch_size. Worker w of k produces the rank's batches w, w + k,
..., and the DataLoader returns them round-robin, i.e. in order. A loader's position is the
number of batches it has handed out, so `state_dict()` / `load_state_dict()` resume exactly,
whatever num_workers is.

Caption dropout (for classifier-free guidance) drops sample i in epoch e when a hash of
(seed, e, i) falls below the rate: reproducible, independent of batch size, workers and ranks. A
dropped caption has all states zero and an all-False mask (the null caption: the model ignores
masks, and an all-False mask carries no caption length, so the unconditional input is the same
for every sample and at sampling time); `caption_dropped` (B,) marks them. Use either this or
`edm.loss(caption_dropout=...)`, not both.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch

from .shards import ShardDataset, ShardVerifier

_MASK64 = (1 << 64) - 1


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser on uint64 arrays (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def sample_uniform(seed: int, epoch: int, indices) -> np.ndarray:
    """A uniform [0, 1) number per (seed, epoch, sample index), the same in every process."""
    base = _splitmix64(np.array([(seed * 0x9E3779B97F4A7C15 + epoch) & _MASK64], dtype=np.uint64))
    x = _splitmix64(np.asarray(indices, dtype=np.int64).astype(np.uint64) ^ base)
    return (x >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


@dataclasses.dataclass(frozen=True)
class BatchPlan:
    """Which samples form batch b of epoch e on one rank, and whose caption is dropped."""

    num_samples: int
    batch_size: int
    rank: int = 0
    world_size: int = 1
    seed: int = 0
    shuffle: bool = True
    drop_last: bool = True
    caption_dropout: float = 0.0

    def __post_init__(self):
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is not in [0, world_size={self.world_size})")
        if not 0.0 <= self.caption_dropout <= 1.0:
            raise ValueError(f"caption_dropout must be in [0, 1], got {self.caption_dropout}")
        if self.batches_per_epoch == 0:
            raise ValueError(f"{self.num_samples} samples give no batch of {self.batch_size} per rank with "
                             f"world_size {self.world_size} (drop_last={self.drop_last})")

    @property
    def samples_per_rank(self) -> int:
        n, w = self.num_samples, self.world_size
        return n // w if self.drop_last else math.ceil(n / w)

    @property
    def batches_per_epoch(self) -> int:
        per, b = self.samples_per_rank, self.batch_size
        return per // b if self.drop_last else math.ceil(per / b)

    def epoch_order(self, epoch: int) -> np.ndarray:
        """All sample indices in epoch `epoch`'s order (before rank splitting)."""
        if self.shuffle:
            return np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)
        return np.arange(self.num_samples)

    def rank_indices(self, epoch: int, order: np.ndarray | None = None) -> np.ndarray:
        """This rank's samples of epoch `epoch`, in order."""
        order = self.epoch_order(epoch) if order is None else order
        per, w = self.samples_per_rank, self.world_size
        if per * w > len(order):  # not drop_last: pad by wrapping, as DistributedSampler does
            order = np.concatenate([order, order[: per * w - len(order)]])
        return order[self.rank::w][:per]

    def batch_indices(self, epoch: int, batch: int, rank_indices: np.ndarray | None = None) -> np.ndarray:
        """Sample indices of batch `batch` of epoch `epoch` on this rank."""
        if not 0 <= batch < self.batches_per_epoch:
            raise IndexError(f"batch {batch} out of range for {self.batches_per_epoch} batches per epoch")
        ri = self.rank_indices(epoch) if rank_indices is None else rank_indices
        return ri[batch * self.batch_size:(batch + 1) * self.batch_size]

    def dropped(self, epoch: int, indices) -> np.ndarray:
        """Whether each sample's caption is dropped in epoch `epoch` (bool array)."""
        if self.caption_dropout <= 0.0:
            return np.zeros(len(indices), dtype=bool)
        return sample_uniform(self.seed, epoch, indices) < self.caption_dropout

    def state(self, position: int, resolution: int) -> dict:
        """A loader's state_dict at `position` (batches consumed on this rank)."""
        per = self.batches_per_epoch
        return {"epoch": position // per, "batch": position % per, "seed": self.seed,
                "num_samples": self.num_samples, "batch_size": self.batch_size, "world_size": self.world_size,
                "rank": self.rank, "shuffle": self.shuffle, "drop_last": self.drop_last,
                "caption_dropout": self.caption_dropout, "resolution": resolution}

    def resume(self, state: dict) -> tuple["BatchPlan", int]:
        """(plan, position) continuing a saved state; a different batch sequence is refused."""
        fixed = {"num_samples": self.num_samples, "batch_size": self.batch_size, "world_size": self.world_size,
                 "shuffle": self.shuffle, "drop_last": self.drop_last}
        diff = [f"{k}: saved {state[k]!r}, now {v!r}" for k, v in fixed.items() if k in state and state[k] != v]
        if diff:
            raise ValueError("cannot resume this loader from a state with a different batch sequence: "
                             + "; ".join(diff))
        plan = dataclasses.replace(self, seed=int(state.get("seed", self.seed)))
        return plan, int(state["epoch"]) * plan.batches_per_epoch + int(state["batch"])

    def positions(self, start: int, step: int = 1):
        """(epoch, batch, indices) for global batch positions start, start + step, ... forever."""
        cached_epoch, cached = None, None
        p = start
        while True:
            epoch, batch = divmod(p, self.batches_per_epoch)
            if epoch != cached_epoch:  # one permutation per epoch, not per batch
                cached_epoch, cached = epoch, self.rank_indices(epoch)
            yield epoch, batch, self.batch_indices(epoch, batch, cached)
            p += step


def open_dataset(root, resolution: int | None = None, verify: bool = False) -> ShardDataset:
    """Shards made by `microdit prepare`, or a folder of MDS shards in the published layout."""
    from .mds import MDSDataset, is_mds_folder

    if is_mds_folder(root):
        return MDSDataset(root, resolution, verify)
    return ShardDataset(root, resolution, verify=verify)


def drop_captions(arrays: dict, dropped: np.ndarray) -> None:
    """Zero the caption states and mask of the dropped rows of `ShardDataset.gather` arrays, in place."""
    if dropped.any():  # on the stored (half-size) arrays, before the float32 copy
        arrays["caption_states"][dropped] = 0
        arrays["caption_mask"][dropped] = False


def make_batch(dataset: ShardDataset, plan: BatchPlan, epoch: int, indices: np.ndarray) -> dict:
    """The training batch of `indices` in epoch `epoch`: stacked tensors, captions, index."""
    arrays = dataset.gather(indices)
    dropped = plan.dropped(epoch, indices)
    drop_captions(arrays, dropped)
    batch = dataset.to_batch(arrays, indices)
    batch.pop("keys", None)
    batch["caption_dropped"] = torch.from_numpy(dropped)
    return batch


class _BatchStream(torch.utils.data.IterableDataset):
    """Batches from position `start` on, forever; worker w of k makes positions start + w + j*k."""

    def __init__(self, dataset: ShardDataset, plan: BatchPlan, start: int):
        self.dataset, self.plan, self.start = dataset, plan, start

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        w, k = (0, 1) if info is None else (info.id, info.num_workers)
        for epoch, _, idx in self.plan.positions(self.start + w, k):
            yield make_batch(self.dataset, self.plan, epoch, idx)


def _identity(x):
    return x


class PlannedLoader:
    """Position bookkeeping shared by the loaders: `plan`, `dataset` and `_position` (batches consumed)."""

    def __len__(self) -> int:
        """Batches per epoch on this rank."""
        return self.plan.batches_per_epoch

    @property
    def epoch(self) -> int:
        return self._position // len(self)

    @property
    def batch(self) -> int:
        return self._position % len(self)

    def state_dict(self) -> dict:
        """The position and everything that fixes the batch sequence."""
        return self.plan.state(self._position, self.dataset.resolution)


class ShardLoader(PlannedLoader):
    """An endless, resumable iterator of training batches over prepared shards (see module doc)."""

    def __init__(self, root, batch_size: int, *, rank: int = 0, world_size: int = 1, seed: int = 0,
                 resolution: int | None = None, caption_dropout: float = 0.0, num_workers: int = 0,
                 drop_last: bool = True, shuffle: bool = True, pin_memory: bool = False,
                 prefetch_factor: int = 2, verify: bool | str = "background", num_samples: int | None = None):
        # verify: "background" (sha256 of every shard in a thread; each batch is handed out only once
        # its shards are verified, and a bad shard found anywhere stops the next batch), True or
        # "open" (all checked here, before returning), False or "off" (header and count checks only,
        # for datasets too large to hash on every run). MDS folders record no sha256: their own checks.
        # num_samples: train on the first N samples only (the rest is held out for validation).
        mode = {True: "open", False: "off"}.get(verify, verify)
        if mode not in ("background", "open", "off"):
            raise ValueError(f"verify must be 'background', 'open' or 'off' (or True / False), got {verify!r}")
        self.dataset = root if isinstance(root, ShardDataset) else open_dataset(root, resolution, verify=mode == "open")
        hashed = all("sha256" in s for s in self.dataset.shards)
        self._verifier = ShardVerifier(self.dataset) if mode == "background" and hashed else None
        n = len(self.dataset) if num_samples is None else num_samples
        if not 0 < n <= len(self.dataset):
            raise ValueError(f"num_samples must be in [1, {len(self.dataset)}], got {num_samples}")
        self.plan = BatchPlan(n, batch_size, rank, world_size, seed, shuffle, drop_last, caption_dropout)
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.num_workers, self.pin_memory, self.prefetch_factor = num_workers, pin_memory, prefetch_factor
        self._position = 0
        self._iter = None

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self._iter is None:
            self._iter = self._batches(self._position)
        batch = next(self._iter)
        if self._verifier is not None:  # in this process, whichever worker read the batch
            self._verifier.require(self.dataset.shards_of(batch["index"]))
        self._position += 1
        return batch

    def _batches(self, start: int):
        if self.num_workers == 0:
            for epoch, _, idx in self.plan.positions(start):
                yield make_batch(self.dataset, self.plan, epoch, idx)
            return
        loader = torch.utils.data.DataLoader(
            _BatchStream(self.dataset, self.plan, start), batch_size=None, collate_fn=_identity,
            num_workers=self.num_workers, pin_memory=self.pin_memory, prefetch_factor=self.prefetch_factor)
        yield from loader

    def close(self) -> None:
        """Stop any worker processes (a later next() starts them again at the same position)."""
        if self._iter is not None:
            self._iter.close()
            self._iter = None

    def load_state_dict(self, state: dict) -> None:
        """Continue from a `state_dict()`: the next batch is the one the saved loader would have given next."""
        self.close()
        self.plan, self._position = self.plan.resume(state)
