"""Tests for what image codecs and text encoders share: lookup by spec scheme and recorded kind
(data/registry.py), and the re-exporting data/encoders.py module."""
import logging

import pytest
import torch

from microdit.data import codecs, encoders, registry, text_encoders
from microdit.data.registry import Encoder, Family


class _Toy(Encoder):
    weights_attr = "module"

    def __init__(self, spec, *, size=1, device="cpu"):
        super().__init__(device)
        self.spec, self.size, self.name = spec, size, f"toy:{spec}"
        self.module = torch.nn.Linear(size, size)

    def metadata(self):
        return {"kind": self.kind, "spec": self.spec, "size": self.size, "fingerprint": f"w{self.size}"}

    @classmethod
    def recorded_options(cls, meta):
        return {"size": meta["size"]}


def _family():
    fam = Family("toy thing", _Toy, fallback="plain", hint="`plain:X` or `fancy:X`", shape_keys=("size",))

    @fam.register
    class Plain(_Toy):
        kind = scheme = "plain"

    @fam.register
    class Fancy(_Toy):
        kind, scheme = "fancy_kind", "fancy"

    return fam, Plain, Fancy


def test_get_by_scheme_with_a_fallback_for_paths_and_hub_ids():
    fam, Plain, Fancy = _family()
    fancy = fam.get(" fancy:a/b ", size=2)
    assert type(fancy) is Fancy and (fancy.spec, fancy.size) == ("a/b", 2)
    assert type(fam.get("plain:x")) is Plain and fam.get("plain:x").spec == "x"
    # no known scheme: a path or hub id for the fallback class, the spec kept whole
    for spec in ("org/model", "/models/c:d", "other:thing"):
        got = fam.get(spec)
        assert type(got) is Plain and got.spec == spec
    assert fam.get(fancy) is fancy  # an encoder already
    with pytest.raises(ValueError, match=r"empty toy thing spec: use `plain:X` or `fancy:X`"):
        fam.get("  ")


def test_from_metadata_rebuilds_by_kind_and_checks_the_result(caplog):
    fam, Plain, Fancy = _family()
    meta = Fancy("m", size=3).metadata()
    again = fam.from_metadata(meta)
    assert type(again) is Fancy and again.metadata() == meta
    moved = fam.from_metadata(meta, spec="other", device="meta")  # overrides win
    assert moved.spec == "other" and moved.device.type == "meta"
    with pytest.raises(ValueError, match=r"unknown toy thing kind 'nope' in metadata"):
        fam.from_metadata({**meta, "kind": "nope"})
    with pytest.raises(ValueError, match=r"not the encoder recorded.*size: 4 recorded, 3 now"):
        fam.from_metadata({**meta, "size": 4}, size=3)
    with caplog.at_level(logging.WARNING, logger=registry.__name__):
        fam.from_metadata({**meta, "fingerprint": "w-other"})
    assert "weights differ" in caplog.text and "w-other" in caplog.text


def test_register_refuses_taken_or_empty_names_and_foreign_classes():
    fam, Plain, _ = _family()

    class Again(_Toy):
        kind, scheme = "again", "plain"

    class Nameless(_Toy):
        kind, scheme = "nameless", ""

    with pytest.raises(ValueError, match="scheme 'plain' is taken by Plain"):
        fam.register(Again)
    with pytest.raises(ValueError, match="scheme '' is empty"):
        fam.register(Nameless)
    with pytest.raises(TypeError, match="not a _Toy"):
        fam.register(int)


def test_to_moves_the_weights():
    toy = _Toy("x")
    assert toy.to("meta") is toy and toy.device.type == "meta" and toy.module.weight.device.type == "meta"


def test_the_shipped_families():
    assert {k: c.__name__ for k, c in codecs.CODECS.by_scheme.items()} == {
        "pixels": "PixelCodec", "vae": "AutoencoderKLCodec"}
    assert {k: c.__name__ for k, c in text_encoders.TEXT_ENCODERS.by_scheme.items()} == {
        "hf": "HFTextEncoder", "minilm": "MiniLMTextEncoder", "openclip": "OpenCLIPTextEncoder"}
    assert set(codecs.CODECS.by_kind) == {"pixels", "autoencoder_kl"}
    assert set(text_encoders.TEXT_ENCODERS.by_kind) == {"hf", "minilm", "openclip"}
    with pytest.raises(ValueError, match="empty image codec spec"):
        codecs.get_codec("")
    with pytest.raises(ValueError, match="empty text encoder spec"):
        text_encoders.get_text_encoder("")
    with pytest.raises(ValueError, match="unknown text encoder kind 'bert'"):
        text_encoders.text_encoder_from_metadata({"kind": "bert", "max_length": 8})
    with pytest.raises(ValueError, match="`minilm` takes no options"):
        text_encoders.get_text_encoder("minilm:large")


def test_encoders_module_only_re_exports():
    """Older code imports from microdit.data.encoders: the same objects, and nothing defined there."""
    for name in encoders.__all__:
        obj = getattr(encoders, name)
        home = codecs if hasattr(codecs, name) else text_encoders
        assert obj is getattr(home, name), name
    own = [k for k, v in vars(encoders).items()
           if callable(v) and getattr(v, "__module__", None) == encoders.__name__]
    assert own == []
    assert set(encoders.__all__) >= {"get_codec", "get_text_encoder", "codec_from_metadata",
                                     "text_encoder_from_metadata", "PixelCodec", "OpenCLIPTextEncoder"}
