"""Inputs that used to be accepted silently: 16-bit images, integer weights, empty sources."""
import io

import numpy as np
import pytest
import torch
from PIL import Image

import microdit
from microdit.data.prepare import PrepareError, prepare
from microdit.data.sources import decode_image
from microdit.models.checkpoint import CheckpointError, load_reference
from tests.data.shard_fixtures import TinyTextEncoder


def test_16_bit_grayscale_is_scaled_not_clipped():
    ramp = np.tile(np.linspace(0, 65535, 32).round().astype(np.uint16), (32, 1))  # black to white
    buf = io.BytesIO()
    Image.fromarray(ramp).save(buf, format="PNG")
    assert Image.open(io.BytesIO(buf.getvalue())).mode == "I;16"
    out = decode_image(buf.getvalue(), "ramp.png", [32], min_size=8)[32]
    assert out.dtype == np.uint8 and out.shape == (32, 32, 3)
    expected = np.rint(ramp[0] / 257.0)
    assert np.abs(out[16, :, 0].astype(float) - expected).max() <= 2  # bicubic at the identity size: exact
    assert (out[..., 0] == out[..., 1]).all() and out[:, 16, 0].std() == 0
    assert out[0, 0, 0] == 0 and out[0, -1, 0] == 255 and 120 <= out[0, 16, 0] <= 135  # mid-grey stays mid-grey


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, torch.complex64])
def test_load_reference_refuses_non_float_tensors(dtype):
    sd = microdit.create_model("MicroDiT_Test_2").state_dict()
    key = "final_layer.linear.weight" if "final_layer.linear.weight" in sd else sorted(sd)[-1]
    sd[key] = sd[key].to(dtype)
    with pytest.raises(CheckpointError, match=rf"tensor '{key}' has dtype {dtype}, expected a floating-point"):
        load_reference(sd)


def test_empty_or_unusable_source_is_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(PrepareError, match="holds no images"):
        prepare(str(tmp_path / "empty"), tmp_path / "out", resolutions=[16], text_encoder=TinyTextEncoder(),
                workers=0, progress=False)
    assert not (tmp_path / "out" / "index.json").exists()
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.png").write_text("not a png")
    (bad / "a.txt").write_text("a caption")
    with pytest.raises(PrepareError, match="none of its 1 items is usable.*cannot decode"):
        prepare(str(bad), tmp_path / "out2", resolutions=[16], text_encoder=TinyTextEncoder(), workers=0,
                progress=False)
    assert not (tmp_path / "out2" / "index.json").exists()


def test_bad_safetensors_names_its_path(tmp_path):
    bad = tmp_path / "model.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    with pytest.raises(CheckpointError, match=f"cannot read {bad} as safetensors"):
        load_reference(bad)
