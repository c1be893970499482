"""Tiny metric models built offline and saved locally: torch-fidelity's Inception-v3 with random
weights, and a tiny Hugging Face CLIP (model, byte-level BPE tokenizer, image processor)."""
import json
from pathlib import Path
from unittest import mock

import torch


def make_inception(path: Path, seed: int = 0) -> Path:
    """torch-fidelity's FeatureExtractorInceptionV3 with seeded random weights, saved as its weights file.

    Convolutions get He-normal weights so that activations keep their scale through the 94 layers
    (PyTorch's default init shrinks the pool features to ~1e-8, where FID is all rounding).
    """
    from microdit import availability

    cls = availability.torch_fidelity_inception().FeatureExtractorInceptionV3
    path = Path(path)
    empty = path.with_suffix(".empty.pth")
    torch.save({}, empty)
    torch.manual_seed(seed)
    # The constructor loads a weights file; build the network without loading, then save its weights.
    with mock.patch.object(cls, "load_state_dict", lambda self, sd, *a, **k: None):
        net = cls("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(empty))
    for m in net.modules():
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    torch.save(net.state_dict(), path)
    empty.unlink()
    return path


def make_clip(folder: Path, seed: int = 0, max_positions: int = 77) -> Path:
    """A tiny CLIPModel + CLIPProcessor saved with save_pretrained (loadable with from_pretrained, offline)."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    chars = sorted(ByteLevel.alphabet())
    merges = [("t", "h"), ("th", "e</w>"), ("a", "n"), ("r", "e"), ("c", "i"), ("l", "e</w>")]
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    tok = CLIPTokenizer(vocab={t: i for i, t in enumerate(tokens)}, merges=merges)
    image_proc = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    text = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=2, max_position_embeddings=max_positions, eos_token_id=tok.eos_token_id,
                bos_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  image_size=32, patch_size=8)
    torch.manual_seed(seed)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(folder)
    CLIPProcessor(image_processor=image_proc, tokenizer=tok).save_pretrained(folder)
    (folder / "MADE_BY.json").write_text(json.dumps({"by": "tests/eval/tiny_models.py", "seed": seed}))
    return folder
