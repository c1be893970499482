"""Image codecs: uint8 images (N, H, W, 3) <-> float32 latents (N, C, H/f, W/f), one interface.

Latents are already shifted and scaled for the diffusion model, `(z - shift_factor) *
scaling_factor`, and back:

- `pixels` / `pixels:F` / `pixels:F:SCALE` / `pixels:F:SCALE:SHIFT`: no VAE; pixel values mapped
  to [-1, 1], optionally space-to-depth by F, optionally shifted by -SHIFT and multiplied by SCALE
  (so that the latents' std matches the diffusion's sigma_data). Exact: decoding gives back the same uint8 image. The embedded CPU demo's default.
- a diffusers `AutoencoderKL` folder or hub id (`vae:` prefix optional: SDXL VAE, the 16-channel
  Flux/Ostris kind), with the `scaling_factor` and `shift_factor` of its config.

`metadata()` is a JSON-able dict from which `codec_from_metadata` rebuilds the same codec (so
shards record how their latents were made). Spec lookup and rebuilding are shared with the text
encoders (data/registry.py); dtype names, weight fingerprints and finding a model by path or hub
id are in data/hub.py.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .. import availability
from .hub import _dtype, _dtype_name, _fingerprint, _from_hub, _local_path, _read_config
from .registry import Encoder, Family

__all__ = ["ImageCodec", "PixelCodec", "AutoencoderKLCodec", "CODECS", "get_codec", "codec_from_metadata"]


class ImageCodec(Encoder):
    """Images <-> scaled latents: uint8 (N, H, W, 3) <-> float32 (N, C, H/f, W/f)."""

    channels: int = 3
    downsample: int = 1
    scaling_factor: float = 1.0
    shift_factor: float = 0.0

    def encode(self, images, generator: torch.Generator | None = None) -> torch.Tensor:
        """Latents (N, C, H/f, W/f) float32, scaled, on the images' device."""
        images = self._check_images(images)
        with torch.no_grad():  # not inference_mode: the results may feed autograd later (training)
            x = images.to(self.device).permute(0, 3, 1, 2).float() / 127.5 - 1.0  # (N, 3, H, W)
            z = self._encode(x, generator).float()  # (N, C, h, w), unscaled
            z = (z - self.shift_factor) * self.scaling_factor
        return z.to(images.device)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images uint8 (N, H, W, 3) from scaled latents, on the latents' device."""
        if not torch.is_tensor(latents) or latents.ndim != 4 or latents.shape[1] != self.channels:
            got = tuple(latents.shape) if torch.is_tensor(latents) else type(latents).__name__
            raise ValueError(f"{self.name}: latents must be (N, {self.channels}, h, w), got {got}")
        with torch.no_grad():
            z = latents.to(self.device, torch.float32) / self.scaling_factor + self.shift_factor
            x = self._decode(z).float()  # (N, 3, H, W) in [-1, 1]
            x = ((x.clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8)
        return x.permute(0, 2, 3, 1).contiguous().to(latents.device)  # (N, H, W, 3)

    def latent_shape(self, height: int, width: int | None = None) -> tuple[int, int, int]:
        """(C, h, w) of the latents of an image of this size."""
        width = height if width is None else width
        return (self.channels, height // self.downsample, width // self.downsample)

    def metadata(self) -> dict:
        """JSON-able description; `codec_from_metadata` rebuilds the codec from it."""
        return {"kind": self.kind, "name": self.name, "channels": self.channels,
                "downsample": self.downsample, "scaling_factor": self.scaling_factor,
                "shift_factor": self.shift_factor}

    def __repr__(self):
        return (f"{type(self).__name__}({self.name!r}, channels={self.channels}, "
                f"downsample={self.downsample}, scaling_factor={self.scaling_factor}, "
                f"shift_factor={self.shift_factor}, device={self.device})")

    def _check_images(self, images) -> torch.Tensor:
        if isinstance(images, np.ndarray):
            images = torch.from_numpy(np.ascontiguousarray(images))
        if not torch.is_tensor(images):
            raise TypeError(f"{self.name}: images must be a uint8 tensor (N, H, W, 3), "
                            f"got {type(images).__name__}")
        if images.dtype != torch.uint8:
            raise TypeError(f"{self.name}: images must be uint8 (N, H, W, 3), got {images.dtype}")
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"{self.name}: images must be (N, H, W, 3), got {tuple(images.shape)}")
        h, w = images.shape[1:3]
        if h % self.downsample or w % self.downsample:
            raise ValueError(f"{self.name}: image size {h}x{w} is not a multiple of the codec's "
                             f"downsampling factor {self.downsample}")
        return images

    def _encode(self, x: torch.Tensor, generator) -> torch.Tensor:
        raise NotImplementedError

    def _decode(self, z: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


CODECS = Family("image codec", ImageCodec, fallback="vae", shape_keys=("channels", "downsample"),
                hint="`pixels`, `pixels:F` or an AutoencoderKL path or hub id")


@CODECS.register
class PixelCodec(ImageCodec):
    """No VAE: latents are pixels in [-1, 1], optionally space-to-depth by `factor`; decoding is exact."""

    kind = scheme = "pixels"

    def __init__(self, factor: int = 1, *, scaling_factor: float = 1.0, shift_factor: float = 0.0,
                 dtype=None, device="cpu"):
        # `dtype` is accepted so callers can pass every codec the same options: pixels stay float32.
        super().__init__(device)
        if int(factor) != factor or factor < 1:
            raise ValueError(f"pixels codec: factor must be a positive integer, got {factor!r}")
        if not scaling_factor or not np.isfinite(scaling_factor):
            raise ValueError(f"pixels codec: scaling_factor must be finite and non-zero, got {scaling_factor!r}")
        if not np.isfinite(shift_factor):
            raise ValueError(f"pixels codec: shift_factor must be finite, got {shift_factor!r}")
        self.factor = int(factor)
        self.name = "pixels" if self.factor == 1 else f"pixels:{self.factor}"
        self.channels = 3 * self.factor ** 2
        self.downsample = self.factor
        self.scaling_factor = float(scaling_factor)
        self.shift_factor = float(shift_factor)

    def _encode(self, x, generator):
        return F.pixel_unshuffle(x, self.factor) if self.factor > 1 else x  # (N, 3F^2, H/F, W/F)

    def _decode(self, z):
        return F.pixel_shuffle(z, self.factor) if self.factor > 1 else z  # (N, 3, H, W)

    def metadata(self) -> dict:
        return {**super().metadata(), "spec": self.name, "factor": self.factor}

    @classmethod
    def from_spec(cls, spec: str, **kw) -> "PixelCodec":
        """`pixels`, `pixels:F`, `pixels:F:SCALE` or `pixels:F:SCALE:SHIFT`."""
        factor, _, rest = (spec.partition(":")[2] or "1").partition(":")
        scale, _, shift = rest.partition(":")
        if not factor.isdigit():
            raise ValueError(f"codec {spec!r}: the space-to-depth factor must be an integer (pixels:F or pixels:F:SCALE)")
        if shift and not scale:
            raise ValueError(f"codec {spec!r}: a SHIFT needs a SCALE (pixels:F:SCALE:SHIFT)")
        # pixels:F:SCALE multiplies the latents by SCALE, so that their std can match the
        # diffusion's sigma_data (0.9) whatever the images' contrast; SHIFT is subtracted from the
        # [-1, 1] pixels first (the diffusers convention: latents = (pixels - SHIFT) * SCALE).
        for name, text, key in (("SCALE", scale, "scaling_factor"), ("SHIFT", shift, "shift_factor")):
            if not text:
                continue
            try:
                value = float(text)
            except ValueError:
                raise ValueError(f"codec {spec!r}: {name} must be a number (pixels:F:SCALE:SHIFT)") from None
            given = kw.pop(key, None)
            if given is not None and float(given) != value:
                raise ValueError(f"codec {spec!r}: its {name.lower()} {value} differs from {key}={given}")
            kw[key] = value
        return cls(int(factor), **kw)

    @classmethod
    def recorded_options(cls, meta: dict) -> dict:
        return {"scaling_factor": meta["scaling_factor"], "shift_factor": meta["shift_factor"]}

    @classmethod
    def rebuild(cls, spec, meta, **kw) -> "PixelCodec":
        return cls.from_spec(spec or "pixels", **{**cls.recorded_options(meta), **kw})


@CODECS.register
class AutoencoderKLCodec(ImageCodec):
    """A diffusers AutoencoderKL from a local folder or hub id; latents = (mean - shift) * scale."""

    kind, scheme = "autoencoder_kl", "vae"
    weights_attr = "vae"

    def __init__(self, spec: str, *, subfolder: str | None = None, sample: bool = False,
                 scaling_factor: float | None = None, shift_factor: float | None = None,
                 dtype=None, device="cpu"):
        super().__init__(device)
        local = _local_path(spec, "AutoencoderKL")
        diffusers = availability.diffusers()
        if not diffusers:
            raise ImportError(f"codec {spec!r} needs diffusers: {diffusers!r}")
        AutoencoderKL = diffusers.AutoencoderKL
        self.dtype = _dtype(dtype)
        if local is not None:
            folder = self._check_folder(local, subfolder)
            vae = AutoencoderKL.from_pretrained(str(folder), torch_dtype=self.dtype, local_files_only=True)
            self.spec, subfolder = str(folder), None  # the folder itself names it: no subfolder to record
        else:
            vae = _from_hub(AutoencoderKL.from_pretrained, spec, "the AutoencoderKL", subfolder=subfolder,
                            torch_dtype=self.dtype)
            self.spec = spec
        self.vae = vae.to(self.device).eval().requires_grad_(False)
        self.subfolder = subfolder
        self.sample = bool(sample)
        cfg = self.vae.config
        self.name = f"vae:{self.spec}" + (f"/{subfolder}" if subfolder else "")
        self.channels = int(cfg.latent_channels)
        self.downsample = 2 ** (len(cfg.block_out_channels) - 1)
        # Explicit factors win: metadata passes back the ones latents were made with, whatever the config says now.
        self.scaling_factor = float(cfg.scaling_factor if scaling_factor is None else scaling_factor)
        config_shift = getattr(cfg, "shift_factor", None) or 0.0  # None in configs that have none
        self.shift_factor = float(config_shift if shift_factor is None else shift_factor)
        self.fingerprint = _fingerprint(self.vae)

    @staticmethod
    def _check_folder(path: Path, subfolder: str | None) -> Path:
        """The folder holding the AutoencoderKL in `path`; a readable error if there is none."""
        if path.is_file():
            raise ValueError(f"{path} is a single file; give a diffusers AutoencoderKL folder "
                             "(config.json + diffusion_pytorch_model.safetensors, as save_pretrained writes)")
        if subfolder is None and not (path / "config.json").is_file() and (path / "vae" / "config.json").is_file():
            subfolder = "vae"  # a whole diffusers pipeline folder
        folder = path / subfolder if subfolder else path
        config = _read_config(folder, "diffusers AutoencoderKL")
        if config.get("_class_name") != "AutoencoderKL":
            raise ValueError(f"{folder} is not an AutoencoderKL: its config.json has "
                             f"_class_name={config.get('_class_name')!r}")
        return folder

    def _encode(self, x, generator):
        posterior = self.vae.encode(x.to(self.dtype)).latent_dist
        z = posterior.sample(generator=generator) if self.sample else posterior.mean
        if not torch.isfinite(z).all():  # a host-device sync, once per batch: worth it to catch fp16 overflow
            raise FloatingPointError(
                f"{self.name}: non-finite latents in {_dtype_name(self.dtype)}. The SDXL VAE overflows "
                "in float16: use bfloat16 or float32, or the fp16-fix VAE (madebyollin/sdxl-vae-fp16-fix)")
        return z

    def _decode(self, z):
        x = self.vae.decode(z.to(self.dtype)).sample
        if not torch.isfinite(x).all():
            raise FloatingPointError(f"{self.name}: non-finite decoded images in {_dtype_name(self.dtype)}; "
                                     "decode in bfloat16 or float32")
        return x

    def metadata(self) -> dict:
        return {**super().metadata(), "spec": self.spec, "subfolder": self.subfolder,
                "sample": self.sample, "dtype": _dtype_name(self.dtype), "fingerprint": self.fingerprint}

    @classmethod
    def recorded_options(cls, meta: dict) -> dict:
        return {"subfolder": meta.get("subfolder"), "sample": meta.get("sample", False),
                # absent (None): the VAE config's own factors, e.g. for the published MDS latents
                "scaling_factor": meta.get("scaling_factor"), "shift_factor": meta.get("shift_factor"),
                "dtype": meta.get("dtype")}



def get_codec(spec, **kw) -> ImageCodec:
    """An image codec: `pixels`, `pixels:F`, `pixels:F:SCALE[:SHIFT]`, or a diffusers AutoencoderKL folder / hub id (`vae:` prefix optional)."""
    return CODECS.get(spec, **kw)


def codec_from_metadata(meta: dict, **kw) -> ImageCodec:
    """Rebuild the codec that `meta` (from `ImageCodec.metadata()`) describes; kw override (e.g. spec=, device=)."""
    return CODECS.from_metadata(meta, **kw)
