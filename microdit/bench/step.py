"""A real training step, timed: the trainer's own `step_once` on a batch already on the device,
for every (backends, compile, precision) configuration, side by side in one process."""
from __future__ import annotations

import contextlib
import functools
import logging
import os
import resource
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import availability
from ..models.presets import preset_config
from . import profile, timing

log = logging.getLogger("microdit.bench")

# The paper's four phases: (training config, latent grid side, mask ratio).
PHASES = {1: ("phase1", 32, 0.75), 2: ("phase2", 32, 0.0), 3: ("phase3", 64, 0.75), 4: ("phase4", 64, 0.0)}
# Every precision the trainer knows, in the order they are shown. A new one (train.precision=X)
# is one entry here plus its case in `precision_reasons`.
PRECISIONS = ("fp32", "bf16", "fp8")
BACKENDS = ("reference", "fast")  # reference: every op's published computation; fast: the automatic choice
# Besides those two, a configuration may pin ops: "attention=flash_attn" (the rest automatic), or
# several joined by "+": "attention=transformer_engine+ln_modulate=triton".


def backends_reasons(name: str) -> list[str]:
    """Why `name` is not a backends configuration (empty when it is)."""
    if name in BACKENDS:
        return []
    from ..ops import import_all
    from ..ops.registry import ALL_OPS

    import_all()
    reasons = []
    for part in name.split("+"):
        op, sep, backend = part.partition("=")
        if not sep or op not in ALL_OPS or backend not in ALL_OPS[op].impls:
            known = ", ".join(f"{o}=" + "|".join(ALL_OPS[o].impls) for o in sorted(ALL_OPS)) if op not in ALL_OPS else \
                "|".join(ALL_OPS[op].impls)
            reasons.append(f"{part!r} is not reference, fast or OP=BACKEND (known: {known})")
    return reasons


def pinned_unavailable(name: str) -> list[str]:
    """Why a pinned configuration (OP=BACKEND[+...]) cannot run on this machine at all, from each
    backend's own availability check (xformers not installed, no CUDA, ...); empty for
    `reference`, `fast` and pins that can run. Such a configuration is listed as skipped with
    these reasons rather than tried and failed; whether a backend supports the step's inputs is
    only known when it runs (a failure then is a failed row with its error)."""
    if name in BACKENDS:
        return []
    malformed = backends_reasons(name)
    if malformed:  # not a configuration at all: say that
        return malformed
    from ..ops.registry import ALL_OPS

    reasons = []
    for part in name.split("+"):
        op, _, backend = part.partition("=")
        why = ALL_OPS[op].reasons(backend)
        if why:
            reasons.append(f"{op}={backend}: " + "; ".join(why))
    return reasons


MODES = ("eager", "compiled")


def precision_reasons(precision: str, device: torch.device) -> list[str]:
    """Why the trainer cannot train at `precision` on `device` (empty when it can)."""
    if precision not in PRECISIONS:
        return [f"unknown precision {precision!r} (known: {', '.join(PRECISIONS)})"]
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return [f"{torch.cuda.get_device_name(device)} has no bf16"]
    if precision == "fp8":
        from .. import fp8

        fp8.fp8_op.warm()
        usable = [n for n, _, r in fp8.fp8_op.table() if not r]
        if not usable:
            return ["no FP8 backend can run here: " + "; ".join(
                f"{n}: {', '.join(r)}" for n, _, r in fp8.fp8_op.table())]
        if device.type == "cuda" and availability.fp8_gpu_reasons():
            return availability.fp8_gpu_reasons()
    return []


def default_precisions(device: torch.device) -> list[str]:
    """What a plain `microdit bench` runs: the trainer's GPU precisions, fp32 on the CPU (where
    bf16 and fp8 are emulation paths; ask for them with --precision)."""
    return ["bf16", "fp8"] if device.type == "cuda" else ["fp32"]


@dataclass
class StepSpec:
    """One measured setting: the model, the phase's sequence shape, the per-device batch."""

    preset: str = "MicroDiT_Micro_2"
    phase: int | None = 1
    latent_size: int | None = None  # default: the phase's (32 at 256 px, 64 at 512 px)
    mask_ratio: float | None = None  # default: the phase's
    micro_batch: int | None = None  # default: the phase config's per-GPU batch (on the CPU / 32)
    device: str = "auto"
    steps: int | None = None  # measured steps (default 20 on a GPU, 5 on the CPU)
    warmup: int | None = None  # untimed steps first (default 5 on a GPU, 2 on the CPU)
    profile_steps: int = 1
    caption_len: int = 77
    overrides: list[str] = field(default_factory=list)  # more training-config key=value

    def resolved(self) -> "StepSpec":
        if self.phase is not None and self.phase not in PHASES:
            raise ValueError(f"--phase must be one of {sorted(PHASES)}; got {self.phase}")
        if self.phase is None and (self.latent_size is None or self.mask_ratio is None):
            raise ValueError("without --phase, give both --latent-size and --mask-ratio")
        dev = self.device if self.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        cuda = torch.device(dev).type == "cuda"
        s = StepSpec(**{**self.__dict__, "device": dev})
        if self.phase is not None:
            _, size, mask = PHASES[self.phase]
            s.latent_size = size if self.latent_size is None else self.latent_size
            s.mask_ratio = mask if self.mask_ratio is None else self.mask_ratio
        if s.micro_batch is None:
            paper = self._config().train.micro_batch
            s.micro_batch = paper if cuda else max(1, paper // 32)
        s.steps = s.steps or (20 if cuda else 5)
        s.warmup = (5 if cuda else 2) if s.warmup is None else s.warmup
        for name in ("micro_batch", "steps", "latent_size"):
            if getattr(s, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1; got {getattr(s, name)}")
        return s

    def _config(self, overrides=()):
        from ..train.config import load_config

        return load_config(PHASES[self.phase][0] if self.phase is not None else None, list(overrides))

    def train_config(self, backends: str, mode: str, precision: str, out: str):
        """The phase's training config with this setting (accumulation 1: one micro-batch a step).
        The optimizer follows the backends: `reference` runs the published AdamW (no fused
        kernel), the others AdamW's fused kernel wherever torch has one for the device (on the CPU
        it is several times faster than foreach, and the trainer's CPU default stays foreach only
        for its golden curves). An `optim.fused=` or `train.flush_denormal=` override still wins."""
        from ..train.optim import fused_supported

        fused = backends != "reference" and fused_supported(torch.device(self.device).type)
        # On the CPU every configuration, reference too, flushes denormals (train.flush_denormal):
        # an FPU mode, not an op, that would otherwise dominate both sides' step time.
        cpu = torch.device(self.device).type == "cpu"
        return self._config([f"optim.fused={fused}", f"train.flush_denormal={cpu}",
            f"model.preset={self.preset}", f"train.micro_batch={self.micro_batch}",
            f"train.global_batch={self.micro_batch}", f"train.device={self.device}",
            f"train.precision={precision}", f"train.compile={mode == 'compiled'}", "train.tensorboard=false",
            "train.init_from=null", f"diffusion.mask_ratio={self.mask_ratio}", f"out={out}", *self.overrides])


class DeviceBatches:
    """An endless loader of one batch already on the device: the bench times the step, not the data."""

    def __init__(self, batch: dict):
        self.batch = batch

    def __iter__(self):
        while True:
            yield self.batch

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


@contextlib.contextmanager
def backend_choice(backends: str):
    """`reference`: every op takes its reference backend (MICRODIT_BACKEND=reference, the
    registry's own switch); `fast`: the automatic choice (the variable cleared)."""
    old = os.environ.pop("MICRODIT_BACKEND", None)
    if backends == "reference":
        os.environ["MICRODIT_BACKEND"] = "reference"
    elif backends != "fast":  # OP=BACKEND[+OP=BACKEND...]: the registry's per-op switch
        os.environ["MICRODIT_BACKEND"] = backends.replace("+", ",")
    try:
        yield
    finally:
        os.environ.pop("MICRODIT_BACKEND", None)
        if old is not None:
            os.environ["MICRODIT_BACKEND"] = old


def make_trainer(spec: StepSpec, backends: str, mode: str, precision: str, out: str):
    """A Trainer of this configuration over `DeviceBatches` (build it inside `backend_choice`)."""
    from ..train.trainer import Trainer

    cfg = spec.train_config(backends, mode, precision, out)
    mcfg = preset_config(spec.preset, **cfg.model.overrides)
    device = torch.device(spec.device)
    g = torch.Generator(device).manual_seed(0)
    size, B = spec.latent_size, spec.micro_batch
    batch = {"latents": torch.randn(B, mcfg.in_channels, size, size, device=device, generator=g),
             "caption_states": torch.randn(B, spec.caption_len, mcfg.caption_channels, device=device, generator=g)}
    info = {"channels": mcfg.in_channels, "latent_size": size, "caption_dim": mcfg.caption_channels,
            "caption_len": spec.caption_len}
    return Trainer(cfg, DeviceBatches(batch), info)


def peak_memory_gib(device: torch.device) -> tuple[float, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30, "max_memory_allocated"
    # Linux reports KiB; the process's high-water mark, not this configuration's alone.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "process peak RSS"


def measure(spec: StepSpec, backends: str, mode: str, precision: str, peaks: dict) -> dict:
    """Time, profile and count one configuration; a row of the results."""
    device = torch.device(spec.device)
    row = {"preset": spec.preset, "phase": spec.phase, "latent_size": spec.latent_size, "mask_ratio": spec.mask_ratio,
           "micro_batch": spec.micro_batch, "backends": backends, "mode": mode, "precision": precision}
    with tempfile.TemporaryDirectory(prefix="microdit-bench-") as out, backend_choice(backends):
        trainer = make_trainer(spec, backends, mode, precision, out)
        batches = [next(iter(trainer.loader))] * trainer.accum
        trainer.model.train()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        step = functools.partial(trainer.step_once, batches)  # one training step (bound: see `del` below)
        first = timing.wall_ms(step, device, warmup=0, reps=1)[0]
        timing.wall_ms(step, device, warmup=max(spec.warmup - 1, 0), reps=0)
        warm_s = time.perf_counter() - t0
        times = timing.wall_ms(step, device, warmup=0, reps=spec.steps)
        mem, mem_kind = peak_memory_gib(device)
        scopes = profile.module_scopes(trainer.raw) if mode == "eager" else contextlib.nullcontext()
        acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA]
                                                        if device.type == "cuda" else [])
        with scopes, torch.profiler.profile(activities=acts, record_shapes=True) as prof:
            for _ in range(spec.profile_steps):
                with torch.profiler.record_function(profile.STEP_SCOPE):
                    step()
                timing.sync(device)
        cats = profile.categorize(prof.events(), device.type, profile.expert_weight_shapes(trainer.raw))
        chosen = trainer.raw.ops.backends()  # op -> the explicit backend, None where automatic
        flops = trainer.flops
        params = trainer.raw.num_parameters()
        trainer.lock.release()  # the run lock on the (temporary) output directory; `run` would release it
        del trainer, prof, step  # free the model and its optimizer before the next configuration
    med = statistics.median(times)
    q = statistics.quantiles(times, n=4) if len(times) >= 2 else [med, med, med]
    ips = spec.micro_batch / (med / 1e3)
    tflops = ips * flops / 1e12
    sheet = peaks.get("datasheet", {}).get(precision)
    row.update(status="ok", images_per_s=ips, step_ms_median=med, step_ms_p25=q[0], step_ms_p75=q[2],
               step_ms_min=min(times), step_ms_max=max(times), steps=len(times), warmup=spec.warmup,
               first_step_ms=first, warmup_s=warm_s, training_gflops_per_image=flops / 1e9, model_tflops=tflops,
               mfu=tflops / peaks["measured_tflops"], mfu_datasheet=tflops / sheet if sheet else None,
               peak_mem_gib=mem, peak_mem_kind=mem_kind, parameters=params, profile=cats,
               mask_backends_explicit=chosen)
    return row


def configurations(backends=BACKENDS, modes=MODES, precisions=None, device=None):
    """Every (backends, mode, precision) asked for, and the precisions not asked for or not
    runnable here, each with its reason (listed, never dropped)."""
    device = torch.device(device or "cpu")
    asked = list(precisions or default_precisions(device))
    for p in asked:
        if p not in PRECISIONS:
            raise ValueError(f"--precision {p!r}: known precisions are {', '.join(PRECISIONS)}")
    for p in PRECISIONS:
        reasons = precision_reasons(p, device)
        if p not in asked:
            reasons = reasons or [f"not asked for (add --precision {p})"]
        for b in backends:
            for m in modes:
                yield b, m, p, reasons


def compile_reasons() -> list[str]:
    if sys.platform == "win32":
        return ["torch.compile's inductor needs a C++ compiler setup not checked on Windows"]
    return []


def measure_peaks(device: torch.device) -> dict:
    """The matmul rate measured now, in this process, and the datasheet's for this device."""
    name = timing.device_name(device)
    return {"measured_tflops": timing.matmul_tflops(device),
            "measured_dtype": "bf16" if device.type == "cuda" else "fp32",
            "datasheet": {p: timing.datasheet_tflops(name, p) for p in PRECISIONS}}


def run_matrix(spec: StepSpec, backends=BACKENDS, modes=MODES, precisions=None, progress=None,
               peaks: dict | None = None) -> list[dict]:
    """Rows of every configuration of one setting, side by side (skipped ones with their reason)."""
    spec = spec.resolved()
    device = torch.device(spec.device)
    peaks = peaks or measure_peaks(device)
    rows = []
    for b, m, p, reasons in configurations(backends, modes, precisions, device):
        if m == "compiled":
            reasons = reasons or compile_reasons()
        reasons = reasons or pinned_unavailable(b)
        base = {"preset": spec.preset, "phase": spec.phase, "latent_size": spec.latent_size,
                "mask_ratio": spec.mask_ratio, "micro_batch": spec.micro_batch, "backends": b, "mode": m,
                "precision": p}
        if reasons:
            rows.append({**base, "status": "skipped", "reason": "; ".join(reasons)})
            continue
        if progress:
            progress(f"phase {spec.phase}: {b} {m} {p} ...")
        try:
            rows.append(measure(spec, b, m, p, peaks))
        except Exception as e:  # a configuration that fails here is a result too (listed with its error)
            log.debug("configuration %s/%s/%s failed", b, m, p, exc_info=True)
            rows.append({**base, "status": "failed", "reason": f"{type(e).__name__}: {e}"[:500]})
    return rows


def add_ratios(rows: list[dict]) -> None:
    """Every ratio measured in the same run, same precision: against the reference backends
    eager, and against the reference backends in the same mode (compiled against compiled)."""
    def ref(mode, precision):
        return next((x for x in rows if x["status"] == "ok" and x["backends"] == "reference"
                     and x["mode"] == mode and x["precision"] == precision), None)

    for r in rows:
        if r["status"] != "ok":
            continue
        for key, base in (("speedup_vs_reference_eager", ref("eager", r["precision"])),
                          ("speedup_vs_reference_same_mode", ref(r["mode"], r["precision"]))):
            if base:
                r[key] = r["images_per_s"] / base["images_per_s"]


def trainer_check(spec: StepSpec, backends: str = "fast", mode: str = "eager", precision: str | None = None) -> dict:
    """`Trainer.run` on the same setting: its own logged perf/images_per_s, to hold the bench to."""
    import json

    spec = spec.resolved()
    device = torch.device(spec.device)
    precision = precision or default_precisions(device)[0]
    n = spec.steps
    with tempfile.TemporaryDirectory(prefix="microdit-bench-run-") as out, backend_choice(backends):
        trainer = make_trainer(spec, backends, mode, precision, out)
        trainer.cfg.train.steps, trainer.cfg.train.log_every = 2 * n, n
        trainer.cfg.train.ckpt_every = 0
        trainer.run()
        logged = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    # Two log intervals of n steps: the first holds the warm-up (and compilation), the second not.
    return {"backends": backends, "mode": mode, "precision": precision, "steps": n,
            "trainer_images_per_s": logged[-1]["perf/images_per_s"]}
