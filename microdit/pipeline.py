"""Text to images in one call: a MicroDiT with its text encoder and image codec (VAE).

    pipe = MicroDiTPipeline.from_published("dit_4_channel_37M_real_and_synthetic_data.pt")
    images = pipe(["An elegant squirrel pirate on a ship"] * 4, steps=30, guidance=5.0, seed=2024)

`from_published` loads a published-format checkpoint and, unless told otherwise, the encoders
the published models were trained with, picked by what the tensors say: the SDXL VAE for 4
latent channels, the Ostris 16-channel VAE for 16, the DFN5B CLIP ViT-H/14-378 text tower for
1024-wide captions; the latent grid and `pos_interp_scale` come from the position table (64
and 2.0 for the 512 px models). `from_run` takes one of our training runs (the encoders its
data was made with), `from_pretrained` a `save_pretrained` folder or hub id (the encoders it
records). Every way in checks that the text encoder's width and the codec's channels are what
the model takes, before any sampling.

Images are a function of (seed, prompt index, k) alone: the noise of image k of prompt i comes
from its own generator, so batch size, the number of processes and the order of jobs do not
change it. This is the one sampling path: `microdit generate`, `microdit sample`, the trainer's
sample grids and `microdit eval` all go through `MicroDiTPipeline.images`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
from pathlib import Path

import numpy as np
import torch

from .diffusion import edm
from .models.checkpoint import CheckpointError
from .models.microdit import MicroDiT
from .progress import Progress

log = logging.getLogger(__name__)

# The published checkpoints' encoders (micro_diffusion's create_latent_diffusion defaults).
PUBLISHED_VAES = {4: ("stabilityai/stable-diffusion-xl-base-1.0", "vae"), 16: ("ostris/vae-kl-f8-d16", None)}
PUBLISHED_TEXT_ENCODER = "openclip:hf-hub:apple/DFN5B-CLIP-ViT-H-14-378"
PUBLISHED_CAPTION = (77, 1024)  # its token states: length, width
SIDECAR = "microdit.json"  # beside an exported published-format checkpoint: config and encoders


class EncoderMismatchError(CheckpointError):
    """A text encoder or codec whose shapes do not fit the model; the message names both sides."""


def image_noise(seed: int, prompt_index: int, k: int, shape) -> torch.Tensor:
    """Unit noise of image k of prompt `prompt_index`: its own CPU generator, so any batching gives it."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + prompt_index * 1009 + k)
    return torch.randn(tuple(shape), generator=g)


def resolve_device(device=None) -> torch.device:
    """`device`, or the GPU where there is one ("auto" or None), else the CPU."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def check_compatible(config, text_encoder=None, codec=None, model_name: str = "the model") -> None:
    """Raise EncoderMismatchError unless the given encoders' shapes are the ones `config` takes."""
    problems = []
    if text_encoder is not None and text_encoder.dim != config.caption_channels:
        problems.append(f"text encoder {text_encoder.name!r} gives {text_encoder.dim}-wide caption states, "
                        f"but {model_name} takes caption_channels={config.caption_channels}")
    if codec is not None and codec.channels != config.in_channels:
        problems.append(f"image codec {codec.name!r} has {codec.channels} latent channels, "
                        f"but {model_name} takes in_channels={config.in_channels}")
    if problems:
        raise EncoderMismatchError("; ".join(problems) + "; pass the encoders the model was trained with "
                                   "(vae= / text_encoder=, or --vae / --text-encoder)")


class MicroDiTPipeline:
    """A MicroDiT, its text encoder and its image codec: prompts in, images out."""

    def __init__(self, model: MicroDiT, text_encoder, codec, *, device=None, dtype=None, name: str = "the model",
                 sigma_data: float | None = None):
        check_compatible(model.config, text_encoder, codec, name)
        self.device = resolve_device(device)
        # The EDM data std the model was trained with (a run's diffusion.sigma_data): the sampler's
        # preconditioning must use the same one. Default: the published 0.9.
        self.edm = edm.DEFAULT if sigma_data is None else dataclasses.replace(edm.DEFAULT, sigma_data=float(sigma_data))
        from .data.hub import _dtype

        # bf16 where there is a GPU (as the published code samples); float32 on the CPU.
        self.dtype = _dtype(dtype) if dtype is not None else (
            torch.bfloat16 if self.device.type == "cuda" else torch.float32)
        self.model = model.to(self.device).eval()
        self.text_encoder = text_encoder.to(self.device)
        self.codec = codec.to(self.device)
        self.name = name

    def __repr__(self):
        c = self.model.config
        return (f"MicroDiTPipeline({self.name}, {self.resolution} px, latents {c.in_channels}x{c.input_size}"
                f"x{c.input_size}, text={self.text_encoder.name!r}, codec={self.codec.name!r}, "
                f"device={self.device}, dtype={self.dtype})")

    @property
    def resolution(self) -> int:
        """Image side in pixels: the model's latent grid times the codec's downsampling."""
        return self.model.config.input_size * self.codec.downsample

    def encoders_metadata(self) -> dict:
        """What `from_pretrained` needs to rebuild this pipeline's encoders."""
        return {"text_encoder": self.text_encoder.metadata(), "codec": self.codec.metadata(),
                "resolution": self.resolution, "sigma_data": self.edm.sigma_data}

    def save_pretrained(self, directory) -> Path:
        """The model in the Hugging Face layout, with these encoders recorded."""
        return self.model.save_pretrained(directory, encoders=self.encoders_metadata())

    # ----------------------------------------------------------------------- construction

    @classmethod
    def from_published(cls, checkpoint, *, vae=None, text_encoder=None, device=None, dtype=None,
                       config=None, backends=None) -> "MicroDiTPipeline":
        """A published-format checkpoint (.pt / .safetensors) with its encoders (see module doc)."""
        from .data.codecs import codec_from_metadata, get_codec
        from .data.text_encoders import get_text_encoder, text_encoder_from_metadata
        from .models.checkpoint import load_reference

        recorded = _recorded_encoders(checkpoint)
        model = load_reference(checkpoint, config or recorded.get("model_config"), backends=backends)
        cfg, name = model.config, f"checkpoint {str(checkpoint)!r}"
        dev = resolve_device(device)
        enc_dtype = _encoder_dtype(dev, dtype)
        # Resolve both specs before loading either, so a mismatch never waits on a download.
        if vae is None and "codec" not in recorded and cfg.in_channels not in PUBLISHED_VAES:
            raise EncoderMismatchError(
                f"{name} has {cfg.in_channels} latent channels; the published VAEs have "
                f"{' or '.join(map(str, PUBLISHED_VAES))}: pass vae= (--vae) with a {cfg.in_channels}-channel VAE")
        if text_encoder is None and "text_encoder" not in recorded and cfg.caption_channels != PUBLISHED_CAPTION[1]:
            raise EncoderMismatchError(
                f"{name} takes {cfg.caption_channels}-wide captions; the published text encoder "
                f"{PUBLISHED_TEXT_ENCODER!r} gives {PUBLISHED_CAPTION[1]}: pass text_encoder= (--text-encoder)")
        if text_encoder is not None:
            text = get_text_encoder(text_encoder, dtype=enc_dtype)
        elif "text_encoder" in recorded:
            text = text_encoder_from_metadata(recorded["text_encoder"])
        else:
            text = get_text_encoder(PUBLISHED_TEXT_ENCODER, max_length=PUBLISHED_CAPTION[0], dtype=enc_dtype)
        check_compatible(cfg, text_encoder=text, model_name=name)  # before the VAE loads
        if vae is not None:
            # The published code scales latents by the VAE's scaling_factor and shifts nothing.
            codec = get_codec(vae, shift_factor=0.0, dtype=enc_dtype)
        elif "codec" in recorded:
            codec = codec_from_metadata(recorded["codec"])
        else:
            spec, subfolder = PUBLISHED_VAES[cfg.in_channels]
            codec = get_codec(spec, subfolder=subfolder, shift_factor=0.0, dtype=enc_dtype)
        return cls(model, text, codec, device=dev, dtype=dtype, name=name, sigma_data=recorded.get("sigma_data"))

    @classmethod
    def from_run(cls, run, *, ema: bool = False, vae=None, text_encoder=None, device=None,
                 dtype=None) -> "MicroDiTPipeline":
        """A training run (its directory: the latest checkpoint; or one checkpoint file) with its data's encoders."""
        from .train.sampling import load_for_sampling

        model, data_info = load_for_sampling(run, ema, "cpu")
        return cls._with_recorded(model, data_info, vae, text_encoder, device, dtype, f"run {str(run)!r}")

    @classmethod
    def from_pretrained(cls, source, *, vae=None, text_encoder=None, device=None, dtype=None,
                        backends=None) -> "MicroDiTPipeline":
        """A `save_pretrained` folder or hub id, with the encoders it records (or those given)."""
        from .models.pretrained import from_pretrained, read_pretrained_config

        _, encoders, _ = read_pretrained_config(source)
        model = from_pretrained(source, backends=backends)
        return cls._with_recorded(model, encoders, vae, text_encoder, device, dtype, f"pretrained {str(source)!r}")

    @classmethod
    def load(cls, source, *, ema: bool = False, **kw) -> "MicroDiTPipeline":
        """Whatever `source` is: a save_pretrained folder or hub id, a training run or checkpoint, or a published checkpoint."""
        from .models.pretrained import is_pretrained_dir

        path = Path(str(source)).expanduser()
        if path.is_dir():
            if is_pretrained_dir(path):
                return cls.from_pretrained(path, **kw)
            return cls.from_run(path, ema=ema, **kw)
        if path.is_file():
            if _is_training_checkpoint(path):
                return cls.from_run(path, ema=ema, **kw)
            if ema:
                raise ValueError(f"{path}: --ema applies to training checkpoints; a published checkpoint "
                                 "holds one set of weights")
            return cls.from_published(path, **kw)
        return cls.from_pretrained(str(source), **kw)  # a hub id (or a clear error naming it)

    @classmethod
    def _with_recorded(cls, model, recorded: dict, vae, text_encoder, device, dtype, name):
        from .data.codecs import codec_from_metadata, get_codec
        from .data.text_encoders import get_text_encoder, text_encoder_from_metadata

        dev = resolve_device(device)
        enc_dtype = _encoder_dtype(dev, dtype)
        missing = [k for k, given in (("text_encoder", text_encoder), ("codec", vae)) if given is None and k not in recorded]
        if missing:
            raise EncoderMismatchError(f"{name} records no {' or '.join(missing)}: pass "
                                       + " and ".join({"text_encoder": "text_encoder=", "codec": "vae="}[k] for k in missing))
        # Recorded encoders keep their recorded dtype: the states the model was trained on.
        text = (get_text_encoder(text_encoder, dtype=enc_dtype) if text_encoder is not None
                else text_encoder_from_metadata(recorded["text_encoder"]))
        check_compatible(model.config, text_encoder=text, model_name=name)
        codec = get_codec(vae, dtype=enc_dtype) if vae is not None else codec_from_metadata(recorded["codec"])
        return cls(model, text, codec, device=dev, dtype=dtype, name=name, sigma_data=recorded.get("sigma_data"))

    # --------------------------------------------------------------------------- sampling

    @torch.no_grad()
    def images(self, prompts, *, steps: int = 30, guidance: float = 5.0, seed: int = 0, num_per_prompt: int = 1,
               batch_size: int = 16, jobs: list[tuple[int, int]] | None = None, progress: bool = False) -> np.ndarray:
        """uint8 images (N, H, W, 3), prompt-major: image k of prompt i for every (i, k), or for `jobs` in order."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if batch_size < 1 or num_per_prompt < 1:
            raise ValueError(f"batch_size and num_per_prompt must be >= 1, got {batch_size} and {num_per_prompt}")
        if jobs is None:
            jobs = [(i, k) for i in range(len(prompts)) for k in range(num_per_prompt)]
        cfg = self.model.config
        shape = (cfg.in_channels, cfg.input_size, cfg.input_size)
        self.model.eval()
        batches = [jobs[s:s + batch_size] for s in range(0, len(jobs), batch_size)]
        bar = Progress(len(batches) * steps, desc="sampling", unit="step", enabled=progress, leave=False,
                       fallback_every=None)
        out = []
        for chunk in batches:
            states, _ = self.text_encoder.encode([prompts[i] for i, _ in chunk])  # (B, L, Cy)
            noise = torch.stack([image_noise(seed, i, k, shape) for i, k in chunk]).to(self.device)
            with self._autocast():
                latents = edm.sample(self.model, noise, states.to(self.device), steps=steps, guidance=guidance,
                                     config=self.edm, callback=lambda *_: bar.update(1))
            out.append(self.codec.decode(latents).cpu().numpy())  # (B, H, W, 3)
        bar.close()
        return np.concatenate(out) if out else np.zeros((0, self.resolution, self.resolution, 3), np.uint8)

    def __call__(self, prompts, *, steps: int = 30, guidance: float = 5.0, seed: int = 0, num_per_prompt: int = 1,
                 batch_size: int = 16, progress: bool = True) -> list:
        """PIL images, prompt-major (prompt 0's num_per_prompt images first); same seed, same images."""
        from PIL import Image

        arrays = self.images(prompts, steps=steps, guidance=guidance, seed=seed, num_per_prompt=num_per_prompt,
                             batch_size=batch_size, progress=progress)
        return [Image.fromarray(a) for a in arrays]

    def _autocast(self):
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        # Weights stay float32; matmuls run in the low-precision dtype, the sampler's state in float64.
        return torch.autocast(self.device.type, dtype=self.dtype)


def _encoder_dtype(device: torch.device, dtype):
    return dtype if dtype is not None else ("bfloat16" if device.type == "cuda" else None)


def _recorded_encoders(checkpoint) -> dict:
    """The microdit.json written beside an exported published-format checkpoint, or {}."""
    if not isinstance(checkpoint, (str, Path)):
        return {}
    path = Path(checkpoint).with_name(SIDECAR)
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e


def _is_training_checkpoint(path: Path) -> bool:
    """Whether `path` is one of our training checkpoints rather than a published state dict.

    Read weights-only (safe_load), so a file from elsewhere never runs code: a planted pickle
    raises UnsafeCheckpointError naming the file.
    """
    from .train.checkpoint import FORMAT, UnsafeCheckpointError, safe_load

    if path.suffix == ".safetensors":
        return False
    try:
        state = safe_load(path)
    except UnsafeCheckpointError:
        raise
    except Exception:  # not a torch file at all: load_reference reports it
        return False
    return isinstance(state, dict) and state.get("format") == FORMAT


# ---------------------------------------------------------------------------------------- CLI

def export(run, to, *, ema: bool = False, format: str = "pretrained") -> Path:
    """A training run's weights (EMA or raw) as a save_pretrained folder or a published-format .pt, encoders recorded."""
    from .data.shards import atomic_write_json
    from .models.checkpoint import save_reference
    from .train.sampling import load_for_sampling

    if format not in {"pretrained", "published"}:
        raise ValueError(f"export format {format!r}: use 'pretrained' or 'published'")
    model, data_info = load_for_sampling(run, ema, "cpu")
    encoders = {k: data_info[k] for k in ("text_encoder", "codec", "resolution", "sigma_data") if k in data_info}
    out = Path(to)
    if format == "pretrained":
        return model.save_pretrained(out, encoders=encoders)
    out.mkdir(parents=True, exist_ok=True)
    config = model.config.to_dict()
    config.pop("backends", None)
    # The published format is a bare state dict; the sidecar keeps what it cannot hold.
    atomic_write_json(out / SIDECAR, {"model_config": config, **encoders})
    return save_reference(model, out / "model.pt")


def generate_images(source, prompts, *, out=None, num_per_prompt: int = 1, steps: int = 30, guidance: float = 5.0,
                    seed: int = 0, ema: bool = False, vae=None, text_encoder=None, batch_size: int = 16, dtype=None,
                    device="auto", progress: bool = True):
    """`microdit generate` as a function: images from `prompts` with any source `MicroDiTPipeline.load`
    takes, split over torchrun ranks; on the main rank the uint8 (N, H, W, 3) images, prompt-major
    (also saved to `out` as <prompt>_<k>.png and grid.png when given), None on the others."""
    from .train import distributed
    from .train.run import setup_logging
    from .train.sampling import generate_distributed, save_images

    info = distributed.setup(device)
    setup_logging(info.is_main)
    try:
        pipe = MicroDiTPipeline.load(source, ema=ema, vae=vae, text_encoder=text_encoder, device=info.device,
                                     dtype=dtype)
        log.info("%r", pipe)
        images = generate_distributed(pipe, prompts, info, num_per_prompt=num_per_prompt, steps=steps,
                                      guidance=guidance, seed=seed, batch_size=batch_size,
                                      progress=info.is_main and progress)
        if info.is_main and out is not None:
            save_images(images, out, num_per_prompt)
            print(f"wrote {len(images)} images and grid.png to {out}")
    finally:
        distributed.teardown()
    return images


def cmd_generate(args) -> int:
    generate_images(args.checkpoint, args.prompts, out=args.out, num_per_prompt=args.num_per_prompt, steps=args.steps,
                    guidance=args.guidance, seed=args.seed, ema=args.ema, vae=args.vae, text_encoder=args.text_encoder,
                    batch_size=args.batch_size, dtype=args.dtype, device=args.device, progress=not args.no_progress)
    return 0


def cmd_export(args) -> int:
    path = export(args.run, args.to, ema=args.ema, format=args.format)
    print(f"exported {'EMA' if args.ema else 'raw'} weights of {args.run} to {path}")
    return 0


def add_parser(sub) -> None:
    from .train.cli import add_sampling_args, positive_int

    p = sub.add_parser("generate", aliases=["sample"], help="images from prompts (a published checkpoint, "
                       "a save_pretrained folder or hub id, or a training run)")
    p.add_argument("checkpoint", help="a published .pt/.safetensors, a save_pretrained folder or hub id, a training "
                   "checkpoint or a training output directory (its latest)")
    p.add_argument("prompts", nargs="+", metavar="PROMPT")
    p.add_argument("--out", required=True, help="directory for <prompt>_<k>.png and grid.png")
    p.add_argument("--num-per-prompt", type=positive_int, default=1)
    p.add_argument("--vae", help="image codec: a diffusers AutoencoderKL folder or hub id, or pixels[:F] "
                   "(default: the recorded one, or the published one for the model's latent channels)")
    p.add_argument("--text-encoder", help="text encoder spec (default: the recorded one, or the published DFN5B CLIP)")
    p.add_argument("--batch-size", type=positive_int, default=16)
    p.add_argument("--dtype", default=None, help="compute dtype (default bfloat16 on a GPU, float32 on the CPU)")
    p.add_argument("--ema", action="store_true", help="a training run's EMA weights")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_sampling_args(p)
    p.set_defaults(fn=cmd_generate)

    p = sub.add_parser("export", help="a training run's weights as a save_pretrained folder or a published .pt")
    p.add_argument("run", help="a training output directory (its latest checkpoint) or a checkpoint file")
    p.add_argument("--to", required=True, help="output folder")
    p.add_argument("--ema", action="store_true", help="export the EMA weights (default: the raw weights)")
    p.add_argument("--format", choices=("pretrained", "published"), default="pretrained",
                   help="pretrained: config.json + model.safetensors; published: model.pt + microdit.json")
    p.set_defaults(fn=cmd_export)
