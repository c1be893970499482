"""The Hugging Face layout for MicroDiT weights: a folder with `config.json` and `model.safetensors`.

This is the layout `huggingface_hub`'s `ModelHubMixin` writes (a JSON of the constructor's
arguments beside one safetensors file), written by hand so that saving needs no dependency and
the JSON stays readable: the MicroDiTConfig fields at the top level, plus

    "_class_name": "MicroDiT", "microdit_version": "...",
    "encoders": {"text_encoder": {...}, "codec": {...}, "resolution": R}   (optional)

where the encoder entries are the `metadata()` dicts of microdit's encoders, so that
`MicroDiTPipeline.from_pretrained` rebuilds the text encoder and VAE the weights were trained
with. A hub id (`org/name`) is fetched with `huggingface_hub.snapshot_download` (cache first);
a local folder needs nothing but itself.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from .checkpoint import CheckpointError
from .config import MicroDiTConfig
from .microdit import MicroDiT

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
CLASS_NAME = "MicroDiT"


def is_pretrained_dir(path) -> bool:
    """Whether `path` is a folder in this layout (config.json naming MicroDiT, and the weights)."""
    p = Path(path)
    if not (p / CONFIG_NAME).is_file() or not (p / WEIGHTS_NAME).is_file():
        return False
    try:
        return json.loads((p / CONFIG_NAME).read_text()).get("_class_name") == CLASS_NAME
    except ValueError:
        return False


def save_pretrained(model: MicroDiT, directory, *, encoders: dict | None = None) -> Path:
    """Write `config.json` + `model.safetensors` into `directory`; `encoders` records how to sample."""
    from safetensors.torch import save_file

    from .. import __version__
    from ..data.shards import atomic_write_json
    from ..files import atomic_path

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    config = model.config.to_dict()
    config.pop("backends", None)  # a per-machine choice, not part of the model
    doc = {"_class_name": CLASS_NAME, "microdit_version": __version__, **config}
    if encoders:
        doc["encoders"] = encoders
    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in model.state_dict().items()}
    with atomic_path(out / WEIGHTS_NAME) as tmp:
        save_file(state, str(tmp), metadata={"format": "pt"})  # "pt": what transformers' loaders check for
    atomic_write_json(out / CONFIG_NAME, doc)
    return out


def resolve_pretrained(source) -> Path:
    """The local folder of `source`: itself, or the Hugging Face cache's snapshot of a hub id."""
    from ..data.hub import _from_hub, _local_path

    local = _local_path(str(source), "pretrained MicroDiT")
    if local is not None:
        if not is_pretrained_dir(local):
            raise CheckpointError(f"{local} is not a pretrained MicroDiT folder: it needs {CONFIG_NAME} "
                                  f"(with _class_name {CLASS_NAME!r}) and {WEIGHTS_NAME}, as save_pretrained writes")
        return local
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:
        raise ImportError(f"loading {source!r} from the hub needs huggingface_hub: pip install huggingface_hub") from e
    folder = Path(_from_hub(snapshot_download, str(source), "the MicroDiT",
                            allow_patterns=[CONFIG_NAME, WEIGHTS_NAME]))
    if not is_pretrained_dir(folder):
        raise CheckpointError(f"hub repo {source!r} holds no {CONFIG_NAME} + {WEIGHTS_NAME} of a MicroDiT")
    return folder


def read_pretrained_config(source) -> tuple[MicroDiTConfig, dict, Path]:
    """(model config, recorded encoders (or {}), local folder) of a pretrained folder or hub id."""
    folder = resolve_pretrained(source)
    doc = json.loads((folder / CONFIG_NAME).read_text())
    fields = {k: v for k, v in doc.items() if k in MicroDiTConfig.fields()}
    return MicroDiTConfig.from_dict(fields), dict(doc.get("encoders") or {}), folder


def from_pretrained(source, *, backends: dict | None = None) -> MicroDiT:
    """A MicroDiT from a folder written by `save_pretrained`, or a hub id holding one."""
    from safetensors.torch import load_file

    from .checkpoint import load_reference

    cfg, _, folder = read_pretrained_config(source)
    state = load_file(str(folder / WEIGHTS_NAME))
    # load_reference checks every tensor's name and shape against the config with clear errors.
    return load_reference(state, cfg, backends=backends)
