"""The image codecs and text encoders under one name, for code written when they shared this module.

Nothing is defined here: image codecs live in data/codecs.py, text encoders in
data/text_encoders.py, what they share in data/registry.py and data/hub.py. New code imports from
those modules (patching a name here does not reach them).
"""
from .codecs import AutoencoderKLCodec, ImageCodec, PixelCodec, codec_from_metadata, get_codec
from .text_encoders import (
    DEFAULT_MAX_LENGTH, HFTextEncoder, MiniLMTextEncoder, OpenCLIPTextEncoder, TextEncoder, get_text_encoder,
    minilm_path, text_encoder_from_metadata,
)

__all__ = [
    "ImageCodec", "PixelCodec", "AutoencoderKLCodec", "TextEncoder", "HFTextEncoder",
    "MiniLMTextEncoder", "OpenCLIPTextEncoder", "minilm_path", "get_codec", "get_text_encoder", "codec_from_metadata",
    "text_encoder_from_metadata", "DEFAULT_MAX_LENGTH",
]
