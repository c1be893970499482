"""The trainer: a small loop that delegates to the model, EDM loss, optimizer, checkpoints and logs."""
from __future__ import annotations

import hashlib
import json
import logging
import random
import signal
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from .. import fp8
from ..diffusion import edm
from ..models.flops import model_flops
from ..models.microdit import MicroDiT
from ..models.presets import preset_config
from ..models.state_dict import shape_mismatches
from . import distributed
from .checkpoint import (FORMAT, CheckpointManager, TrainCheckpointError, UnsafeCheckpointError, load_checkpoint,
                         resolve_checkpoint)
from .config import TrainConfig
from .ema import EMA
from .metrics import MetricsWriter, ProgressBar
from .optim import build_optimizer, lr_at, set_lr
from .runlock import RunLock, RunLockError, sweep_temp_files
from .signals import StopSignals, TrainingInterrupted

log = logging.getLogger("microdit.train")
FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


class NonFiniteLossError(RuntimeError):
    pass


def step_seed(seed: int, step: int, micro: int) -> int:
    """A 63-bit seed for one micro-step: the diffusion noise is a pure function of (seed, step, micro)."""
    h = hashlib.blake2b(f"{seed}/{step}/{micro}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


def rng_state() -> dict:
    """Every RNG state as plain data and tensors, so a checkpoint loads with `weights_only=True`."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), int(pos),
                                                    int(has_gauss), float(gauss)),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.int64).astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def build_model(cfg: TrainConfig, data_info: dict) -> MicroDiT:
    """The configured preset, sized to the data: latent channels and grid, caption width."""
    overrides = dict(cfg.model.overrides)
    overrides.setdefault("in_channels", data_info["channels"])
    overrides.setdefault("input_size", data_info["latent_size"])
    overrides.setdefault("caption_channels", data_info["caption_dim"])
    overrides["backends"] = dict(cfg.model.backends)
    return MicroDiT(preset_config(cfg.model.preset, **overrides))


def load_initial_weights(model: MicroDiT, source) -> None:
    """Weights of a previous phase (training checkpoint or published format); the position table
    is kept as this model built it when the latent grid differs (phase 3 of the recipe)."""
    from ..models.checkpoint import extract_state_dict
    from ..models.checkpoint import read as read_published

    path = resolve_checkpoint(source)
    try:
        state = load_checkpoint(path)["model"]
    except UnsafeCheckpointError:
        raise
    except TrainCheckpointError:
        state = read_published(path)  # the published format, also read weights-only
    sd = extract_state_dict(state, str(path))
    own = model.state_dict()
    if sd["pos_embed"].shape != own["pos_embed"].shape:
        log.info("init_from %s: latent grid changed, position table regenerated", path)
        sd["pos_embed"] = own["pos_embed"]
    for k, v in own.items():
        if k not in sd:
            raise TrainCheckpointError(f"init_from {path}: missing tensor {k!r}")
        if sd[k].shape != v.shape:
            raise TrainCheckpointError(f"init_from {path}: tensor {k!r} has shape {tuple(sd[k].shape)}, "
                                       f"this model needs {tuple(v.shape)}")
    model.load_state_dict({k: sd[k] for k in own}, strict=True)


def check_data_scale(latents: torch.Tensor, sigma_data: float, tolerance: float = 1.6) -> float:
    """The latents' std; a warning when it is far from `sigma_data` (EDM's c_skip, c_out and loss
    weights assume it), naming the fix. Low-contrast pixel data (the Shapes demo: std 0.26 in
    [-1, 1]) trained with sigma_data 0.9 learns only token-sized blobs (docs/demo_experiments.md)."""
    std = float(latents.float().std())
    if not sigma_data / tolerance <= std <= sigma_data * tolerance:
        scale = sigma_data / max(std, 1e-12)
        log.warning("the training latents have std %.3f but diffusion.sigma_data is %.3g: prepare them scaled "
                    "by about %.2f (pixels codec: data.codec=pixels:F:%.2f; a VAE: its scaling_factor)",
                    std, sigma_data, scale, scale)
    return std


class Trainer:
    """Trains a MicroDiT on batches {"latents": (B,C,H,W), "caption_states": (B,L,Cy)} from `loader`.

    `loader` is iterable (infinitely) and has state_dict()/load_state_dict(); `data_info` holds
    channels, latent_size, caption_dim and optionally caption_len and the encoders' metadata.
    """

    def __init__(self, cfg: TrainConfig, loader, data_info: dict, dist_info: distributed.DistInfo | None = None,
                 resume: bool = False, callbacks=(), validator=None):
        self.cfg, self.loader, self.data_info = cfg, loader, data_info
        self.validator = validator  # microdit.train.validation.Validator, or None
        self.callbacks = list(callbacks)  # each called as fn(trainer, loss_tensor) after every step
        self.dist = dist_info or distributed.setup(cfg.train.device)
        self.device = self.dist.device
        self.out = Path(cfg.out)
        self.lock = self._lock_out()
        try:
            self._build(resume)
        except BaseException:
            self.lock.release()
            raise

    def _lock_out(self) -> RunLock:
        """Rank 0 locks OUT; every rank learns whether it could, so that all fail together, at once."""
        lock, err = RunLock(self.out), None
        if self.dist.is_main:
            try:
                lock.acquire()
                sweep_temp_files(self.out / "checkpoints")  # no other run writes here: leftovers are dead
            except RunLockError as e:
                err = e
        ok = distributed.all_reduce_min(torch.tensor(0.0 if err else 1.0, device=self.device), self.dist)
        if err:
            raise err
        if ok.item() == 0:
            raise RunLockError(f"{self.out} is in use by another training run (rank 0 could not lock it)")
        return lock

    def _build(self, resume: bool) -> None:
        cfg, data_info = self.cfg, self.data_info
        t = cfg.train
        per_step = t.micro_batch * self.dist.world_size
        if t.global_batch % per_step:
            raise ValueError(f"train.global_batch {t.global_batch} is not a multiple of micro_batch "
                             f"{t.micro_batch} x world size {self.dist.world_size}")
        self.accum = t.global_batch // per_step
        precision = t.precision if t.precision != "auto" else ("bf16" if self.device.type == "cuda" else "fp32")
        # fp8: the block GEMMs in FP8 (microdit.fp8), everything else in bf16 on a GPU, fp32 on a CPU.
        bf16 = precision == "bf16" or precision == "fp8" and self.device.type == "cuda"
        self.autocast = torch.autocast(self.device.type, dtype=torch.bfloat16) if bf16 else nullcontext()
        self.precision = precision
        self.edm_config = cfg.diffusion.edm_config()  # the EDM constants of every step after the curriculum
        self.high_noise_edm_config = cfg.diffusion.edm_config(0)  # those of its first high_noise_steps

        if t.flush_denormal and self.device.type == "cpu" and not torch.set_flush_denormal(True):
            log.warning("train.flush_denormal: this CPU cannot flush denormals (no SSE3); left as is")
        torch.manual_seed(t.seed)  # the same initial weights on every rank
        self.raw = build_model(cfg, data_info).initialize_weights().to(self.device)
        if t.init_from:
            load_initial_weights(self.raw, t.init_from)
        if precision == "fp8":
            fp8.convert(self.raw, backend=cfg.fp8.backend, recipe=cfg.fp8.recipe)
        fp8_attention = cfg.model.backends.get("attention") == "transformer_engine"
        self.fp8_context = lambda: fp8.autocast(self.raw, fp8_attention=fp8_attention)  # a fresh one per use
        self.model = distributed.wrap(self.raw, self.dist, t.parallel)
        # After wrapping: under FSDP2 the EMA then holds this rank's shards only, like the parameters.
        self.ema = EMA(self.raw, cfg.ema.decay, cfg.ema.start_step) if cfg.ema.enabled else None
        self.optimizer = build_optimizer(self.model, cfg.optim)
        self.forward = torch.compile(self.model) if t.compile else self.model
        self.ckpts = CheckpointManager(self.out / "checkpoints", keep=t.keep_checkpoints)
        self.step = 0
        self.bad_steps = 0
        self.skipped_steps = 0
        if resume:
            self._resume()
        self.flops = model_flops(self.raw.config, cfg.diffusion.mask_ratio,
                                 caption_len=data_info.get("caption_len", 77)).training
        self.metrics = MetricsWriter(self.out, enabled=self.dist.is_main, tensorboard=t.tensorboard)

    # ------------------------------------------------------------------ state
    def _extra_state(self) -> dict:
        """Everything but the model, optimizer and EMA tensors."""
        return {
            "fp8_scaling": fp8.scaling_state(self.raw),  # beside the published-format model state
            "step": self.step,
            "skipped_steps": self.skipped_steps,
            "data": self.loader.state_dict(),
            "rng": rng_state(),
            "config": self.cfg.to_dict(),
            "model_config": self.raw.config.to_dict(),
            "data_info": self.data_info,
            "world_size": self.dist.world_size,
        }

    def state_dict(self) -> dict:
        """The whole state with full tensors (gathered under FSDP: a collective)."""
        return {
            "model": get_model_state_dict(self.model, options=FULL),
            "optimizer": get_optimizer_state_dict(self.model, self.optimizer, options=FULL),
            "ema": self.ema.state_dict() if self.ema else None,
            **self._extra_state(),
        }

    def _sharded_tensors(self) -> tuple[dict, list]:
        """(model, optimizer and EMA tensors as this rank holds them, the optimizer's param_groups)."""
        optim = get_optimizer_state_dict(self.model, self.optimizer)
        tensors = {"model": get_model_state_dict(self.model), "optimizer": optim["state"]}
        if self.ema:
            tensors["ema"] = self.ema.sharded_state_dict()["shadow"]
        return tensors, optim["param_groups"]

    def save(self) -> Path | None:
        """A checkpoint of the current step: one full file from rank 0, or a DCP folder from every rank."""
        if self.cfg.train.checkpoint == "dcp":
            from . import dcp

            tensors, groups = self._sharded_tensors()
            extra = {"format": FORMAT, "kind": "dcp", **self._extra_state(), "param_groups": groups,
                     "ema_meta": {"decay": self.ema.decay, "start_step": self.ema.start_step} if self.ema else None}
            path = self.ckpts.path_for(self.step, "dcp")
            if self.dist.is_main:
                self.ckpts.dir.mkdir(parents=True, exist_ok=True)
            dcp.save(path, tensors, extra, is_main=self.dist.is_main, barrier=lambda: distributed.barrier(self.dist))
            if self.dist.is_main:
                self.ckpts.commit(path)
            distributed.barrier(self.dist)
            return path if self.dist.is_main else None
        state = self.state_dict()  # collective under FSDP: every rank takes part
        path = None
        if self.dist.is_main:
            path = self.ckpts.save(state, self.step)
        distributed.barrier(self.dist)
        return path

    def _resume(self) -> None:
        found = self.ckpts.load_latest(sharded=True)
        if found is None:
            log.info("no checkpoint in %s: starting from scratch", self.ckpts.dir)
            return
        state, path = found
        sharded = state.get("kind") == "dcp"
        if sharded:
            shapes = {k[len("model."):]: v for k, v in state["tensor_shapes"].items() if k.startswith("model.")}
        else:
            shapes = {k: tuple(v.shape) for k, v in state["model"].items()}
        self._check_same_model(shapes, state, path)
        data = self._data_state_for_this_world(state, path, sharded)
        if sharded:
            from . import dcp

            tensors, _ = self._sharded_tensors()
            dcp.load_into(path, tensors)  # reshards onto this run's ranks
            set_model_state_dict(self.model, tensors["model"])
            set_optimizer_state_dict(self.model, self.optimizer,
                                     {"state": tensors["optimizer"], "param_groups": state["param_groups"]})
            if self.ema:
                self.ema.load_state_dict(dict(state["ema_meta"], shadow=tensors["ema"]))
        else:
            set_model_state_dict(self.model, state["model"], options=FULL)
            set_optimizer_state_dict(self.model, self.optimizer, state["optimizer"], options=FULL)
            if self.ema:
                self.ema.load_state_dict(state["ema"])
        fp8.load_scaling_state(self.raw, state.get("fp8_scaling", {}))
        self.step, self.skipped_steps = state["step"], state.get("skipped_steps", 0)
        self.loader.load_state_dict(data)
        set_rng_state(state["rng"])
        log.info("resumed from %s at step %d", path, self.step)

    def _data_state_for_this_world(self, state: dict, path, sharded: bool) -> dict:
        """The loader state to continue from on this run's ranks.

        Another world size gives the same batches when the global micro-batch (micro_batch x ranks)
        is unchanged: rank r takes samples r, r + W, ... of each global micro-batch, in the loader
        and in the trainer's noise, so only the per-rank batch size and the world size change."""
        data, saved_world = dict(state["data"]), state["world_size"]
        if saved_world == self.dist.world_size:
            return data
        saved_micro = state["config"]["train"]["micro_batch"]
        now_micro = self.cfg.train.micro_batch
        if not sharded or saved_micro * saved_world != now_micro * self.dist.world_size:
            raise TrainCheckpointError(
                f"{path}: written by {saved_world} ranks x micro_batch {saved_micro}, resuming on "
                f"{self.dist.world_size} x {now_micro}; the data order would change. Resume on another number of "
                "ranks from a train.checkpoint=dcp checkpoint with train.micro_batch x ranks unchanged "
                f"({saved_micro * saved_world})")
        for key, value in (("world_size", self.dist.world_size), ("batch_size", now_micro), ("rank", self.dist.rank)):
            if key in data:
                data[key] = value
        log.info("%s: written on %d ranks, resuming on %d", path, saved_world, self.dist.world_size)
        return data

    def _check_same_model(self, saved: dict, state: dict, path) -> None:
        """A checkpoint of another model (say another preset) fails in one message naming the file and
        summarising the differences, instead of one line per mismatched tensor. `saved`: name -> shape."""
        own = {k: tuple(v.shape) for k, v in self.raw.state_dict().items()}
        differ, missing, extra = shape_mismatches(own, saved)
        missing = sorted(missing)
        if not (differ or missing or extra):
            return
        mine, theirs = self.raw.config.to_dict(), state.get("model_config") or {}
        settings = [f"{k} {theirs[k]!r} (now {mine[k]!r})" for k in mine if k in theirs and theirs[k] != mine[k]]
        parts = [f"{len(differ)} tensors differ in shape (first {differ[0]}: saved {saved[differ[0]]}, "
                 f"this model {own[differ[0]]})" if differ else "",
                 f"{len(missing)} missing (first {missing[0]})" if missing else "",
                 f"{len(extra)} unexpected (first {extra[0]})" if extra else ""]
        raise TrainCheckpointError(
            f"{path}: written for another model ({', '.join(settings[:6]) or 'other tensors'}); "
            + "; ".join(p for p in parts if p)
            + f"; resume with the run's own settings (see {self.out / 'config.json'}) or train into a new --out")

    # ------------------------------------------------------------------ one step
    def _noise(self, batch_local: int, micro: int, shape) -> edm.StepRandomness:
        """Randomness of the global micro-batch, drawn identically on every rank; this rank's share."""
        world, rank = self.dist.world_size, self.dist.rank
        g = torch.Generator(self.device).manual_seed(step_seed(self.cfg.train.seed, self.step, micro))
        step = edm.draw_step(batch_local * world, shape, patch_size=self.raw.config.patch_size,
                             mask_ratio=self.cfg.diffusion.mask_ratio, ops=self.raw.ops, device=self.device,
                             generator=g)
        # Rank r holds samples r, r + W, r + 2W, ... of the global micro-batch (the loader's
        # stride), so W ranks see exactly the randomness one process would for the same batch.
        return step[rank::world]

    def step_edm_config(self):
        """The EDM constants of the current step: `edm_config`, or the noise curriculum's
        (diffusion.high_noise_*) during its first steps."""
        return self.high_noise_edm_config if self.step < self.cfg.diffusion.high_noise_steps else self.edm_config

    def train_step(self, batches) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step over `accum` micro-batches; returns (mean loss, grad norm) as tensors."""
        total = torch.zeros((), device=self.device)
        for micro, batch in enumerate(batches):
            x0 = batch["latents"].to(self.device, non_blocking=True)
            y = batch["caption_states"].to(self.device, non_blocking=True)
            step = self._noise(x0.shape[0], micro, x0.shape[1:])
            with distributed.no_sync(self.model, micro == self.accum - 1), self.autocast, self.fp8_context():
                loss = edm.loss(self.forward, x0, y, step=step, config=self.step_edm_config())
            (loss / self.accum).backward()
            total += loss.detach()
        with torch.profiler.record_function("microdit::clip_grad_norm"):  # a category of `microdit bench`
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.grad_clip)
        return total / self.accum, grad_norm

    def step_once(self, batches, stop: bool = False) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """One whole training step as `run` takes it (learning rate, `train_step`, the optimizer
        step or a skip when non-finite, EMA); `microdit bench` times exactly this. `stop`: this
        rank got a stop signal. Returns (loss, grad norm, whether every rank goes on)."""
        t = self.cfg.train
        set_lr(self.optimizer, lr_at(self.step, t.steps, self.cfg.optim))
        loss, grad_norm = self.train_step(batches)
        # One host-device sync per step: the price of skipping a non-finite step exactly. The
        # flag is reduced over ranks so that every rank takes the same decision.
        if hasattr(grad_norm, "full_tensor"):  # FSDP2 returns a DTensor norm
            grad_norm = grad_norm.full_tensor()
        # A stop signal rides on the same reduction: if any rank got one, all stop after this step.
        flags = torch.stack([(torch.isfinite(loss) & torch.isfinite(grad_norm)).float(),
                             torch.tensor(0.0 if stop else 1.0, device=self.device)])
        ok, go_on = (bool(f > 0) for f in distributed.all_reduce_min(flags, self.dist).tolist())
        if ok:
            self.optimizer.step()
            self.bad_steps = 0
        else:
            self.bad_steps += 1
            self.skipped_steps += 1
            log.warning("step %d: non-finite loss or gradient, step skipped (%d in a row)", self.step, self.bad_steps)
            if self.bad_steps >= t.max_bad_steps:
                raise NonFiniteLossError(f"{self.bad_steps} non-finite steps in a row at step {self.step}; stopping")
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        if self.ema and ok:
            with torch.profiler.record_function("microdit::ema"):
                self.ema.update(self.raw, self.step)
        return loss, grad_norm, go_on

    def run(self) -> dict:
        t, cfg = self.cfg.train, self.cfg
        if self.dist.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
        try:
            with StopSignals() as signals:
                return self._run(signals)
        finally:
            self.lock.release()

    def _run(self, signals: StopSignals) -> dict:
        t, cfg = self.cfg.train, self.cfg
        it = iter(self.loader)
        bar = ProgressBar(t.steps, initial=self.step, enabled=self.dist.is_main)
        last_t, last_step = time.perf_counter(), self.step
        losses = []
        self.model.train()
        self.validate(force=True)  # at the start (step 0, or the resumed step): the curve's first point
        while self.step < t.steps:
            batches = [next(it) for _ in range(self.accum)]
            if self.step == 0:
                check_data_scale(batches[0]["latents"], cfg.diffusion.sigma_data)
            loss, grad_norm, go_on = self.step_once(batches, stop=bool(signals.signum))
            for fn in self.callbacks:
                fn(self, loss)
            if self.step % t.log_every == 0 or self.step == t.steps:
                now = time.perf_counter()
                ips = (self.step - last_step) * t.global_batch / max(now - last_t, 1e-9)
                last_t, last_step = now, self.step
                lval = distributed.all_reduce_mean(loss.detach().float(), self.dist).item()
                losses.append((self.step, lval))
                self.metrics.log(self.step, self._metrics(lval, grad_norm.item(), ips))
                bar.update(self.step, loss=lval, ips=ips)
            if not go_on:
                bar.close()
                self.metrics.close()
                path = self.save()
                stop = TrainingInterrupted(signals.signum or signal.SIGTERM, self.step, path or self.ckpts.dir)
                log.warning("%s", stop)
                raise stop
            if t.ckpt_every and self.step % t.ckpt_every == 0 and self.step < t.steps:
                self.save()
            if t.sample_every and self.step % t.sample_every == 0 and self.step < t.steps:
                self.sample_grid()
            self.validate(force=self.step == t.steps)
        bar.close()
        final = self.save()
        self.sample_grid()
        summary = {"steps": self.step, "skipped_steps": self.skipped_steps, "final_checkpoint": str(final),
                   "loss_curve": losses, "precision": self.precision, "world_size": self.dist.world_size,
                   "device": str(self.device), "parameters": self.raw.num_parameters()}
        if self.dist.is_main:
            (self.out / "summary.json").write_text(json.dumps(summary, indent=2))
        self.metrics.close()
        return summary

    def _metrics(self, loss: float, grad_norm: float, ips: float) -> dict:
        m = {"loss/train": loss, "optim/lr": self.optimizer.param_groups[0]["lr"], "optim/grad_norm": grad_norm,
             "perf/images_per_s": ips, "perf/model_tflops": ips * self.flops / 1e12,
             "optim/skipped_steps": self.skipped_steps}
        if self.device.type == "cuda":
            m["memory/max_reserved_gib"] = torch.cuda.max_memory_reserved(self.device) / 2**30
        return m

    def validate(self, force: bool = False) -> dict | None:
        """Validation metrics (all ranks) when due or forced, logged to metrics.jsonl and TensorBoard."""
        if self.validator is None or not (force or self.validator.due(self.step)):
            return None
        values = self.validator(self, force=force)
        self.metrics.log(self.step, values)
        return values

    def sampling_model(self) -> MicroDiT | None:
        """A plain copy of the current (EMA, if any) weights on the main rank, None elsewhere.

        Full weights on every rank (a collective under FSDP: all ranks call this), then the main
        rank samples alone with the copy, so sharded training is never stepped by one rank.
        """
        weights = self.ema.full_state_dict() if self.ema else get_model_state_dict(self.model, options=FULL)
        if not self.dist.is_main:
            return None
        model = MicroDiT(self.raw.config).to(self.device)
        model.load_state_dict({k: v.to(self.device) for k, v in weights.items()})
        return model.eval()

    def sampling_info(self) -> dict:
        """The data info with this run's EDM data std, as sampling needs it (and load_for_sampling gives)."""
        return dict(self.data_info, sigma_data=self.cfg.diffusion.sigma_data)

    def sample_grid(self) -> Path | None:
        """A grid for the fixed prompts with the current (EMA, if any) weights; needs the data's encoders."""
        if "text_encoder" not in self.data_info or "codec" not in self.data_info or not self.cfg.train.sample_prompts:
            return None
        model = self.sampling_model()
        path = None
        if self.dist.is_main:
            from .sampling import encoders_from, generate, save_grid

            try:
                encoders = encoders_from(self.data_info, self.device)
            # e.g. the published VAE offline, or a recorded encoder folder that is no longer one
            # (ValueError): not worth ending a run over
            except (OSError, ImportError, ValueError) as e:
                log.warning("sample grid skipped: cannot load the data's encoders (%s)", e)
                encoders = None
        if self.dist.is_main and encoders is not None:
            images = generate(model, self.cfg.train.sample_prompts, self.sampling_info(),
                              steps=self.cfg.train.sample_steps, guidance=self.cfg.train.sample_guidance,
                              seed=self.cfg.train.seed, encoders=encoders)
            path = self.out / "samples" / f"step_{self.step:08d}.png"
            save_grid(images, path, nrow=len(self.cfg.train.sample_prompts))
        distributed.barrier(self.dist)
        return path
