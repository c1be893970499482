"""microdit: MicroDiT diffusion transformers trained from scratch on a micro-budget."""
from __future__ import annotations

from .diffusion import edm
from .models.checkpoint import CheckpointError, load_reference, save_reference
from .models.config import MicroDiTConfig
from .models.microdit import MicroDiT
from .models.presets import PRESETS, preset_config
from .pipeline import MicroDiTPipeline

__version__ = "0.1.0"


def create_model(name: str, *, device=None, **overrides) -> MicroDiT:
    """A freshly initialised MicroDiT of preset `name`; `overrides` are MicroDiTConfig fields."""
    model = MicroDiT(preset_config(name, **overrides)).initialize_weights()
    return model.to(device) if device is not None else model


__all__ = ["MicroDiT", "MicroDiTConfig", "PRESETS", "CheckpointError", "MicroDiTPipeline", "create_model", "edm",
           "load_reference", "preset_config", "save_reference"]
