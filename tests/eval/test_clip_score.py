"""CLIP score against torchmetrics' CLIPScore on the same tiny, locally saved CLIP model and images."""
import numpy as np
import pytest
import torch

from microdit.eval.clip_score import CLIPScorer, clip_score
from tests.eval.conftest import shapes_images


class _TensorFeatures(torch.nn.Module):
    """The CLIP model with get_*_features returning the embedding tensor: torchmetrics 1.9 expects a
    tensor, transformers 5 returns an output object (its pooler_output is the same projected embedding)."""

    def __init__(self, model):
        super().__init__()
        self.model, self.config = model, model.config

    def get_image_features(self, *a, **k):
        return self.model.get_image_features(*a, **k).pooler_output

    def get_text_features(self, *a, **k):
        return self.model.get_text_features(*a, **k).pooler_output


def test_clip_score_equals_torchmetrics(tiny_clip):
    # torchmetrics imports torch-fidelity when it is installed; without torchvision that import
    # only works through microdit's bare-namespace entry, so make it first.
    from microdit import availability

    availability.torch_fidelity_inception()
    tm = pytest.importorskip("torchmetrics.multimodal.clip_score", reason="torchmetrics (the `eval` extra)")
    from transformers import CLIPModel, CLIPProcessor

    images, captions = shapes_images(6, seed=3)
    scorer = CLIPScorer(str(tiny_clip), batch_size=4)
    ours = scorer.scores(images, captions)
    assert ours.shape == (6,) and np.ptp(ours) > 0

    def load():
        m = CLIPModel.from_pretrained(tiny_clip)
        return (_TensorFeatures(m) if not torch.is_tensor(m.get_text_features(torch.tensor([[1, 2]]))) else m,
                CLIPProcessor.from_pretrained(tiny_clip))

    metric = tm.CLIPScore(model_name_or_path=load)
    chw = [torch.from_numpy(im).permute(2, 0, 1) for im in images]
    metric.update(chw, captions)
    assert clip_score(ours) == pytest.approx(float(metric.compute()), rel=1e-5, abs=1e-5)
    # The metric's state holds the sum of unclamped scores: compare the mean before the clamp at
    # 0 (a random tiny CLIP may score below 0), and per image (a mean could hide errors).
    assert float(metric.score) / int(metric.n_samples) == pytest.approx(ours.mean(), rel=1e-5, abs=1e-4)
    for im, cap, s in zip(chw, captions, ours):
        one = tm.CLIPScore(model_name_or_path=load)
        one.update([im], [cap])
        assert float(one.score) == pytest.approx(s, rel=1e-5, abs=1e-4)


def test_long_captions_truncated_by_the_tokenizer(tiny_clip):
    scorer = CLIPScorer(str(tiny_clip))
    long = " and ".join(["a large red circle at the top left", "a small blue square at the bottom right"] * 2)
    tok = scorer.processor.tokenizer(long)["input_ids"]
    assert len(tok) > scorer.max_length
    cut = scorer.processor.tokenizer([long], truncation=True, max_length=scorer.max_length)["input_ids"][0]
    assert len(cut) == scorer.max_length and cut[-1] == scorer.processor.tokenizer.eos_token_id
    # The score of the long caption is the score of its tokenizer-truncated tokens.
    ids = torch.tensor([cut])
    ref = scorer.model.get_text_features(input_ids=ids, attention_mask=torch.ones_like(ids))
    ref = getattr(ref, "pooler_output", ref)
    got = scorer.text_features([long])
    torch.testing.assert_close(got, ref / ref.norm(dim=-1, keepdim=True))
    assert scorer.metadata()["max_caption_tokens"] == scorer.max_length


def test_clip_errors(tiny_clip, tmp_path):
    with pytest.raises(FileNotFoundError, match="CLIP model"):
        CLIPScorer(str(tmp_path / "missing" / "clip"))
    scorer = CLIPScorer(str(tiny_clip))
    with pytest.raises(ValueError, match="2 images but 1 captions"):
        scorer.scores(np.zeros((2, 8, 8, 3), np.uint8), ["x"])
    with pytest.raises(ValueError, match="uint8"):
        scorer.scores(np.zeros((1, 8, 8, 3), np.float32), ["x"])
