"""Validation during training: EDM loss on held-out samples at fixed noise levels, optionally FID-K and CLIP score.

The loss is `edm.loss` unmasked at each sigma of `val.sigmas`, with noise that is a function of
(val.seed, sample, sigma) alone: the same sigmas and noise at every validation, in every run. It
runs the eager, unwrapped model (never the torch.compile'd one) in fixed batches of samples
(batch b = samples b*B..(b+1)*B-1, batch b on rank b mod W), and the per-batch sums are added
in float64 in batch order, so the same weights give the same number whether the run compiles
or not and on any number of ranks. With `val.fid_every`, images generated for the first
`val.fid_samples` held-out captions are scored against those samples' own images (FID-K, a trend
rather than a comparable FID) and, with `val.clip_model`, by CLIP score, on the main rank.
"""
from __future__ import annotations

import hashlib
import logging
import math

import numpy as np
import torch

from ..diffusion import edm
from . import distributed

log = logging.getLogger("microdit.train")


def _noise_seed(seed: int, sample: int, k: int) -> int:
    h = hashlib.blake2b(f"val/{seed}/{sample}/{k}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


class HeldOut:
    """Samples `indices` of a dataset with `get_batch(indices)` (a ShardDataset): the validation set."""

    def __init__(self, dataset, indices):
        self.dataset, self.indices = dataset, [int(i) for i in indices]
        if not self.indices:
            raise ValueError("the validation split is empty: raise data.val_fraction or give --val-data")

    def __len__(self) -> int:
        return len(self.indices)

    def get_batch(self, positions) -> dict:
        return self.dataset.get_batch([self.indices[p] for p in positions])


class Validator:
    """`__call__(trainer)` -> {"loss/val": mean over sigmas, "loss/val_sigma_<s>": ...} (every rank takes part)."""

    def __init__(self, val_cfg, data: HeldOut, diffusion_cfg):
        self.cfg, self.data = val_cfg, data
        self.n = min(len(data), val_cfg.samples)
        self.sigmas = [float(s) for s in val_cfg.sigmas]
        if not self.sigmas or min(self.sigmas) <= 0:
            raise ValueError(f"val.sigmas must be positive noise levels, got {val_cfg.sigmas!r}")
        self.edm = diffusion_cfg.edm_config()
        self._noise: dict[int, torch.Tensor] = {}

    def due(self, step: int) -> bool:
        c = self.cfg
        return bool(c.every and step % c.every == 0) or bool(c.fid_every and step % c.fid_every == 0)

    def _fixed_noise(self, batch: int, positions, shape) -> torch.Tensor:
        """(K, B, C, H, W) noise of this batch's samples at each sigma; made once, kept on the CPU."""
        if batch not in self._noise:
            self._noise[batch] = torch.stack([
                torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(_noise_seed(self.cfg.seed, p, k)))
                             for p in positions]) for k in range(len(self.sigmas))])
        return self._noise[batch]

    def __call__(self, trainer, force: bool = False) -> dict:
        out = self.loss(trainer)
        if self.cfg.fid_every and (force or trainer.step % self.cfg.fid_every == 0):
            out.update(self.image_metrics(trainer))
        return out

    @torch.no_grad()
    def loss(self, trainer) -> dict:
        model, dist, device = trainer.raw, trainer.dist, trainer.device
        B = self.cfg.batch_size
        batches = [list(range(s, min(self.n, s + B))) for s in range(0, self.n, B)]
        mine = list(range(dist.rank, len(batches), dist.world_size))
        # Under FSDP every forward is a collective: all ranks run the same number of batches
        # (a rank short of one repeats its last batch and drops the result).
        rounds = math.ceil(len(batches) / dist.world_size)
        sums = torch.zeros(len(batches), len(self.sigmas), dtype=torch.float64)
        was_training = model.training
        model.eval()
        for r in range(rounds):
            b = mine[r] if r < len(mine) else (mine[-1] if mine else 0)
            pos = batches[b]
            data = self.data.get_batch(pos)
            x0 = torch.as_tensor(data["latents"]).to(device, torch.float32)
            y = torch.as_tensor(data["caption_states"]).to(device, torch.float32)
            noise = self._fixed_noise(b, pos, tuple(x0.shape[1:]))
            for k, sigma in enumerate(self.sigmas):
                # edm.loss draws sigma = exp(rnd * P_std + P_mean): the rnd that gives `sigma`.
                rnd = torch.full((len(pos), 1, 1, 1), (math.log(sigma) - self.edm.P_mean) / self.edm.P_std,
                                 device=device)
                with trainer.autocast:
                    loss = edm.loss(model, x0, y, rnd_normal=rnd, noise=noise[k].to(device), config=self.edm)
                if r < len(mine):
                    sums[b, k] = float(loss) * len(pos)
        model.train(was_training)
        if dist.enabled:  # each batch's sum comes from one rank: a SUM is exact (x + 0.0 == x)
            sums_dev = sums.to(device)
            torch.distributed.all_reduce(sums_dev, op=torch.distributed.ReduceOp.SUM)
            sums = sums_dev.cpu()
        per_sigma = sums.numpy().sum(axis=0) / self.n  # float64, batch order
        out = {f"loss/val_sigma_{s:g}": float(v) for s, v in zip(self.sigmas, per_sigma)}
        out["loss/val"] = float(np.mean(per_sigma))
        return out


    def image_metrics(self, trainer) -> dict:
        """{"eval/fid_k", "eval/clip_score"} on the main rank ({} elsewhere; every rank takes part)."""
        from ..eval.clip_score import CLIPScorer, clip_score
        from ..eval.fid import InceptionFeatures, Statistics, fid
        from .sampling import encoders_from, generate

        model = trainer.sampling_model()  # a collective
        out = {}
        if trainer.dist.is_main:
            c = self.cfg
            k = min(c.fid_samples, len(self.data))
            text_encoder, codec = encoders_from(trainer.data_info, trainer.device)
            if not hasattr(self, "_real"):  # the held-out captions and their images: fixed, made once
                batch = self.data.get_batch(list(range(k)))
                self._captions = list(batch["captions"])
                self._real = codec.decode(torch.as_tensor(batch["latents"]).to(trainer.device)).cpu().numpy()
                self._inception = InceptionFeatures(c.inception, device=trainer.device)
                self._ref = Statistics.of(self._inception(self._real))
                self._clip = CLIPScorer(c.clip_model, device=trainer.device) if c.clip_model else None
            fake = generate(model, self._captions, trainer.sampling_info(), steps=c.fid_steps, guidance=c.fid_guidance,
                            seed=c.seed, encoders=(text_encoder, codec))
            out["eval/fid_k"] = fid(Statistics.of(self._inception(fake)), self._ref)
            if self._clip is not None:
                out["eval/clip_score"] = clip_score(self._clip.scores(fake, self._captions))
        distributed.barrier(trainer.dist)
        return out


def build_validator(cfg, train_dataset=None, val_dataset=None) -> Validator | None:
    """The run's validator: `val_dataset` (--val-data), else the held-out tail of `train_dataset`
    (data.val_fraction); None when validation is off (val.every and val.fid_every 0)."""
    if not (cfg.val.every or cfg.val.fid_every):
        return None
    if val_dataset is not None:
        data = HeldOut(val_dataset, range(len(val_dataset)))
    elif train_dataset is not None and cfg.data.val_fraction > 0:
        n = len(train_dataset)
        held = held_out_count(n, cfg.data.val_fraction)
        data = HeldOut(train_dataset, range(n - held, n))
    else:
        raise ValueError("val.every is set but there is no validation data: give --val-data (val.data) "
                         "or data.val_fraction > 0")
    return Validator(cfg.val, data, cfg.diffusion)


def held_out_count(n: int, fraction: float) -> int:
    """Samples held out of n for data.val_fraction (at least 1 when the fraction is positive)."""
    if not 0 <= fraction < 1:
        raise ValueError(f"data.val_fraction must be in [0, 1), got {fraction}")
    return 0 if fraction == 0 else max(1, int(round(n * fraction)))
