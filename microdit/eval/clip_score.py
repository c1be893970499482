"""CLIP score (Hessel et al. 2021): 100 * cos(image embedding, caption embedding), with a Hugging Face CLIP.

Images and captions go through the model's own CLIPProcessor (its resize, crop and
normalisation; its tokenizer). Captions longer than the text tower's positions are truncated by
the tokenizer (`truncation=True`), which keeps the end-of-text token the text embedding is read
from. The reported score is max(mean, 0), as torchmetrics' `CLIPScore` reports it.
"""
from __future__ import annotations

import numpy as np
import torch

from .. import availability
from ..data.hub import _from_hub, _local_path


class CLIPScorer:
    """Per-image CLIP scores for uint8 (N, H, W, 3) images and their captions."""

    def __init__(self, model: str, device="cpu", batch_size: int = 32):
        tf = availability.transformers()
        path = _local_path(model, "CLIP model")
        load_model, load_proc = tf.CLIPModel.from_pretrained, tf.CLIPProcessor.from_pretrained
        if path is not None:
            self.model, self.processor = load_model(path), load_proc(path)
        else:
            self.model = _from_hub(load_model, model, "CLIP model")
            self.processor = _from_hub(load_proc, model, "CLIP processor")
        self.spec = model
        self.device = torch.device(device)
        self.model = self.model.to(self.device).eval()
        self.batch_size = batch_size
        self.max_length = int(self.model.config.text_config.max_position_embeddings)

    def metadata(self) -> dict:
        import transformers

        cfg = self.model.config
        return {"library": f"transformers {transformers.__version__}", "model": self.spec,
                "name_or_path": getattr(cfg, "_name_or_path", ""), "max_caption_tokens": self.max_length,
                "truncation": "tokenizer (truncation=True, end-of-text token kept)",
                "image_processing": type(self.processor.image_processor).__name__}

    @torch.no_grad()
    def image_features(self, images) -> torch.Tensor:
        images = np.asarray(images)
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"CLIP score needs uint8 (N, H, W, 3) images; got {images.dtype} {images.shape}")
        # CHW uint8 tensors: the processor's input format that torchmetrics uses as well.
        chw = [torch.from_numpy(im).permute(2, 0, 1) for im in images]
        pixels = self.processor(images=chw, return_tensors="pt")["pixel_values"].to(self.device)
        return _embedding(self.model.get_image_features(pixel_values=pixels))

    @torch.no_grad()
    def text_features(self, captions: list[str]) -> torch.Tensor:
        tok = self.processor.tokenizer(list(captions), padding=True, truncation=True, max_length=self.max_length,
                                       return_tensors="pt")
        return _embedding(self.model.get_text_features(input_ids=tok["input_ids"].to(self.device),
                                                       attention_mask=tok["attention_mask"].to(self.device)))

    def scores(self, images, captions: list[str]) -> np.ndarray:
        """100 * cosine similarity per (image, caption) pair, float64 (N,)."""
        if len(images) != len(captions):
            raise ValueError(f"CLIP score: {len(images)} images but {len(captions)} captions")
        out = []
        for s in range(0, len(captions), self.batch_size):
            im = self.image_features(images[s:s + self.batch_size])
            tx = self.text_features(captions[s:s + self.batch_size])
            out.append((100 * (im * tx).sum(-1)).double().cpu().numpy())
        return np.concatenate(out) if out else np.zeros(0)


def _embedding(out) -> torch.Tensor:
    """L2-normalised embeddings from get_*_features (a tensor, or an output object in newer transformers)."""
    feats = out if torch.is_tensor(out) else getattr(out, "pooler_output", None)
    if feats is None:
        feats = out[0]
    return feats / feats.norm(p=2, dim=-1, keepdim=True)


def clip_score(per_image: np.ndarray) -> float:
    """The reported CLIP score: max(mean of per-image scores, 0)."""
    return float(max(np.mean(per_image), 0.0)) if len(per_image) else float("nan")
