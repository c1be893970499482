"""MicroDiTPipeline and `microdit generate` on a published-format checkpoint with a tiny VAE and CLIP text model."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from microdit import MicroDiT, MicroDiTPipeline, availability, create_model, edm, save_reference
from microdit.pipeline import EncoderMismatchError, image_noise

pytestmark = pytest.mark.skipif(not (availability.diffusers() and availability.transformers()),
                                reason="needs diffusers and transformers (pip install 'microdit[hf]')")

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
PROMPTS = ["a red circle at the top", "a small blue square", "green triangle"]
WORDS = "a red blue green circle square triangle small large at the top bottom".split()
STEPS, GUIDANCE, SEED = 3, 3.0, 7


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<pad>", "<unk>", "<bos>", "<eos>"] + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A <eos>", special_tokens=[("<bos>", 2), ("<eos>", 3)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>",
                                   bos_token="<bos>", eos_token="<eos>")


def _clip(path, width):
    import transformers as tf

    torch.manual_seed(width)
    model = tf.CLIPTextModel(tf.CLIPTextConfig(vocab_size=len(WORDS) + 4, hidden_size=width, intermediate_size=32,
                                               num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=77,
                                               pad_token_id=0, bos_token_id=2, eos_token_id=3)).eval()
    model.save_pretrained(path)
    _tokenizer().save_pretrained(path)
    return model


def _vae(path, channels):
    from diffusers import AutoencoderKL

    torch.manual_seed(channels)
    vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        block_out_channels=(8, 16), layers_per_block=1, latent_channels=channels, norm_num_groups=4,
                        sample_size=16, scaling_factor=0.5, mid_block_add_attention=False).eval()
    vae.save_pretrained(path)
    return vae


def tiny_model(**kw) -> MicroDiT:
    """MicroDiT_Test_2 for 4-channel 8x8 latents and 16-wide captions, every weight random (so captions matter)."""
    torch.manual_seed(0)
    model = create_model("MicroDiT_Test_2", in_channels=4, caption_channels=16, input_size=8, **kw)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    root = tmp_path_factory.mktemp("published")
    model = tiny_model()
    save_reference(model, root / "dit.pt")
    return {"root": root, "ckpt": root / "dit.pt", "model": model,
            "vae": (root / "vae", _vae(root / "vae", 4)), "clip": (root / "clip", _clip(root / "clip", 16))}


@pytest.fixture(scope="module")
def pipe(parts):
    return MicroDiTPipeline.from_published(parts["ckpt"], vae=str(parts["vae"][0]), text_encoder=str(parts["clip"][0]),
                                           device="cpu")


def by_hand(parts, prompts, num_per_prompt, seed):
    """Text encoder -> edm.sample -> VAE decode with the libraries' own objects."""
    clip, vae, model = parts["clip"][1], parts["vae"][1], parts["model"]
    tok = _tokenizer()(prompts, padding="max_length", max_length=77, return_tensors="pt")
    with torch.no_grad():
        states = clip(input_ids=tok["input_ids"]).last_hidden_state  # (P, 77, 16): causal CLIP, no mask
    out = []
    for i in range(len(prompts)):
        for k in range(num_per_prompt):
            g = torch.Generator().manual_seed(seed * 1_000_003 + i * 1009 + k)
            noise = torch.randn((1, 4, 8, 8), generator=g)
            z = edm.sample(model, noise, states[i:i + 1], steps=STEPS, guidance=GUIDANCE)
            with torch.no_grad():
                x = vae.decode(z / 0.5).sample
            out.append(((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy())
    return np.concatenate(out)


def close(a, b):
    """uint8 images equal up to one level where float32 rounding lands on the other side of .5."""
    assert a.shape == b.shape and a.dtype == b.dtype == np.uint8
    diff = np.abs(a.astype(int) - b.astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01, (diff.max(), (diff > 0).mean())


def test_pipeline_equals_hand_composition(parts, pipe):
    assert pipe.resolution == 16 and pipe.dtype == torch.float32
    images = pipe.images(PROMPTS, steps=STEPS, guidance=GUIDANCE, seed=SEED, num_per_prompt=2)
    assert images.shape == (6, 16, 16, 3)
    close(images, by_hand(parts, PROMPTS, 2, SEED))
    # PIL images from __call__, prompt-major, the same pixels
    pil = pipe(PROMPTS, steps=STEPS, guidance=GUIDANCE, seed=SEED, num_per_prompt=2, progress=False)
    assert [im.size for im in pil] == [(16, 16)] * 6
    assert np.array_equal(np.stack([np.asarray(im) for im in pil]), images)


def test_batching_does_not_change_images_and_seeds_do(pipe):
    kw = dict(steps=STEPS, guidance=GUIDANCE, num_per_prompt=2)
    a = pipe.images(PROMPTS, seed=SEED, batch_size=6, **kw)
    close(pipe.images(PROMPTS, seed=SEED, batch_size=1, **kw), a)
    close(pipe.images(PROMPTS, seed=SEED, jobs=[(2, 1), (0, 0)], **kw), a[[5, 0]])
    b = pipe.images(PROMPTS, seed=SEED + 1, **kw)
    assert np.abs(a.astype(int) - b.astype(int)).mean() > 1
    # the noise is a function of (seed, prompt, k) alone
    assert torch.equal(image_noise(1, 2, 3, (4, 8, 8)), image_noise(1, 2, 3, (4, 8, 8)))
    assert not torch.equal(image_noise(1, 2, 3, (4, 8, 8)), image_noise(1, 2, 4, (4, 8, 8)))


def test_bfloat16_sampling_and_the_position_table(parts, pipe, tmp_path):
    # bf16 (the GPU default) through autocast: the float32 images, up to low-precision noise
    low = MicroDiTPipeline.from_published(parts["ckpt"], vae=str(parts["vae"][0]), text_encoder=str(parts["clip"][0]),
                                          device="cpu", dtype="bfloat16")
    assert low.dtype == torch.bfloat16 and next(low.model.parameters()).dtype == torch.float32
    kw = dict(steps=STEPS, guidance=GUIDANCE, seed=SEED)
    diff = np.abs(low.images(PROMPTS, **kw).astype(int) - pipe.images(PROMPTS, **kw).astype(int))
    assert 0 < diff.mean() < 3
    # a 512 px-style table (pos_interp_scale 2 on a 2x grid) is read from the tensors
    save_reference(create_model("MicroDiT_Test_2", in_channels=4, caption_channels=16, input_size=16,
                                pos_interp_scale=2.0), tmp_path / "p2.pt")
    big = MicroDiTPipeline.from_published(tmp_path / "p2.pt", vae=str(parts["vae"][0]),
                                          text_encoder=str(parts["clip"][0]), device="cpu")
    assert big.model.config.pos_interp_scale == 2.0 and big.resolution == 32
    assert big.images(PROMPTS[:1], steps=1, guidance=1.0).shape == (1, 32, 32, 3)


def test_generate_cli_makes_the_pipelines_images(parts, pipe, tmp_path):
    out = tmp_path / "gen"
    r = subprocess.run([sys.executable, "-m", "microdit.cli", "generate", str(parts["ckpt"]), *PROMPTS[:2],
                        "--vae", str(parts["vae"][0]), "--text-encoder", str(parts["clip"][0]), "--steps", str(STEPS),
                        "--guidance", str(GUIDANCE), "--seed", str(SEED), "--num-per-prompt", "2", "--device", "cpu",
                        "--batch-size", "3", "--out", str(out)], env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    expected = pipe.images(PROMPTS[:2], steps=STEPS, guidance=GUIDANCE, seed=SEED, num_per_prompt=2)
    made = np.stack([np.asarray(Image.open(out / f"{i}_{k}.png")) for i in range(2) for k in range(2)])
    assert np.array_equal(made, expected)
    assert Image.open(out / "grid.png").size == (2 * 18 + 2, 2 * 18 + 2)


def test_mismatched_encoders_fail_before_sampling_naming_both_sides(parts, tmp_path, monkeypatch):
    def no_sampling(*a, **k):
        raise AssertionError("sampled")

    monkeypatch.setattr(edm, "sample", no_sampling)
    _clip(tmp_path / "clip24", 24)
    _vae(tmp_path / "vae16", 16)
    ckpt, vae, clip = str(parts["ckpt"]), str(parts["vae"][0]), str(parts["clip"][0])
    with pytest.raises(EncoderMismatchError, match=r"clip24.* 24-wide .*dit\.pt.* caption_channels=16"):
        MicroDiTPipeline.from_published(ckpt, vae=vae, text_encoder=str(tmp_path / "clip24"), device="cpu")
    with pytest.raises(EncoderMismatchError, match=r"vae16.* 16 latent channels.*dit\.pt.* in_channels=4"):
        MicroDiTPipeline.from_published(ckpt, vae=str(tmp_path / "vae16"), text_encoder=clip, device="cpu")
    # the published defaults: 16-wide captions are not the DFN5B CLIP's 1024, said before any download
    with pytest.raises(EncoderMismatchError, match=r"16-wide captions.*DFN5B.*1024"):
        MicroDiTPipeline.from_published(ckpt, vae=vae, device="cpu")
    save_reference(create_model("MicroDiT_Test_2", in_channels=3, caption_channels=16, input_size=8), tmp_path / "c3.pt")
    with pytest.raises(EncoderMismatchError, match=r"3 latent channels; the published VAEs have 4 or 16"):
        MicroDiTPipeline.from_published(tmp_path / "c3.pt", text_encoder=clip, device="cpu")
    # the CLI says the same
    r = subprocess.run([sys.executable, "-m", "microdit.cli", "generate", ckpt, "x", "--vae", vae, "--text-encoder",
                        str(tmp_path / "clip24"), "--device", "cpu", "--out", str(tmp_path / "o")],
                       env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "caption_channels=16" in r.stderr and "24-wide" in r.stderr
    assert not (tmp_path / "o").exists()


def test_published_defaults_follow_the_tensors(monkeypatch, parts):
    """4 channels -> the SDXL VAE, 1024-wide captions -> DFN5B CLIP (recorded specs, not downloaded here)."""
    from microdit.data import codecs, text_encoders

    asked = []

    def fake_codec(spec, **kw):
        asked.append(("codec", spec, kw.get("subfolder"), kw.get("shift_factor")))
        raise OSError("offline")

    def fake_text(spec, **kw):
        asked.append(("text", spec, kw.get("max_length")))
        return type("Text", (), {"dim": 1024, "name": spec})()

    monkeypatch.setattr(codecs, "get_codec", fake_codec)
    monkeypatch.setattr(text_encoders, "get_text_encoder", fake_text)
    tmp = parts["root"] / "xl_like.pt"
    save_reference(create_model("MicroDiT_Test_2", in_channels=4, caption_channels=1024, input_size=8), tmp)
    with pytest.raises(OSError, match="offline"):
        MicroDiTPipeline.from_published(tmp, device="cpu")
    text = ("text", "openclip:hf-hub:apple/DFN5B-CLIP-ViT-H-14-378", 77)
    assert asked == [text, ("codec", "stabilityai/stable-diffusion-xl-base-1.0", "vae", 0.0)]
    asked.clear()
    save_reference(create_model("MicroDiT_Test_2", in_channels=16, caption_channels=1024, input_size=8), tmp)
    with pytest.raises(OSError, match="offline"):
        MicroDiTPipeline.from_published(tmp, device="cpu")
    assert asked == [text, ("codec", "ostris/vae-kl-f8-d16", None, 0.0)]


def test_save_pretrained_round_trip(parts, pipe, tmp_path):
    model = parts["model"]
    model.save_pretrained(tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.json", "model.safetensors"]
    again = MicroDiT.from_pretrained(tmp_path / "m")
    assert again.config == model.config
    a, b = model.state_dict(), again.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # a pipeline saved with its encoders needs nothing else to load
    pipe.save_pretrained(tmp_path / "p")
    loaded = MicroDiTPipeline.from_pretrained(tmp_path / "p", device="cpu")
    kw = dict(steps=STEPS, guidance=GUIDANCE, seed=SEED)
    assert np.array_equal(loaded.images(PROMPTS, **kw), pipe.images(PROMPTS, **kw))
    with pytest.raises(EncoderMismatchError, match="records no text_encoder or codec"):
        MicroDiTPipeline.from_pretrained(tmp_path / "m", device="cpu")


def test_from_pretrained_errors_name_the_source(tmp_path, monkeypatch):
    from microdit import CheckpointError

    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="empty is not a pretrained MicroDiT folder"):
        MicroDiT.from_pretrained(tmp_path / "empty")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError, match="'nobody-here/no-such-microdit'.*HF_HOME"):
        MicroDiT.from_pretrained("nobody-here/no-such-microdit")


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """Two steps of the demo config (tiny model, 16 px shapes, MiniLM captions), EMA on."""
    from microdit.data.text_encoders import get_text_encoder
    from microdit.data.prepare import prepare

    root = tmp_path_factory.mktemp("demo")
    prepare("shapes", root / "data", resolutions=(16,), codec="pixels",
            text_encoder=get_text_encoder("minilm", max_length=16), num=16, seed=0, progress=False)
    r = subprocess.run([sys.executable, "-m", "microdit.cli", "train", "--config", "demo", "--data", str(root / "data"),
                        "--out", str(root / "run"), "--steps", "2", "data.resolution=16", "ema.enabled=true",
                        "ema.start_step=0", "model.preset=MicroDiT_Test_2", "train.global_batch=8",
                        "train.micro_batch=8", "train.tensorboard=false", "train.sample_steps=1",
                        "train.precision=fp32", "diffusion.sigma_data=0.5"],
                       env=ENV, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return root / "run"


@pytest.mark.slow
def test_export_a_demo_run_then_generate_from_the_export(demo_run, tmp_path):
    from microdit.pipeline import export
    from microdit.train.checkpoint import load_checkpoint, resolve_checkpoint

    prompts, kw = ["a large red circle in the center", "a small blue square"], dict(steps=2, guidance=3.0, seed=3)
    expected = MicroDiTPipeline.from_run(demo_run, ema=True, device="cpu").images(prompts, **kw)
    export(demo_run, tmp_path / "pre", ema=True)
    export(demo_run, tmp_path / "pub", ema=True, format="published")
    assert sorted(p.name for p in (tmp_path / "pub").iterdir()) == ["microdit.json", "model.pt"]
    ckpt = resolve_checkpoint(demo_run)  # a training checkpoint file: told apart from a published .pt
    assert np.array_equal(MicroDiTPipeline.load(ckpt, ema=True, device="cpu").images(prompts, **kw), expected)
    # The run trained with diffusion.sigma_data 0.5: sampling preconditions with it, by hand the same
    run_pipe = MicroDiTPipeline.from_run(demo_run, ema=True, device="cpu")
    assert run_pipe.edm.sigma_data == 0.5
    states, _ = run_pipe.text_encoder.encode(prompts)
    noise = torch.stack([image_noise(3, i, 0, (3, 16, 16)) for i in range(2)])
    lats = {sd: edm.sample(run_pipe.model, noise, states, steps=2, guidance=3.0, config=edm.EDMConfig(sigma_data=sd))
            for sd in (0.5, 0.9)}
    assert np.array_equal(run_pipe.codec.decode(lats[0.5]).numpy(), expected)
    # Compared as latents: a 2-step model's decoded images can saturate to the same 0/255 pixels.
    assert not torch.allclose(lats[0.5], lats[0.9])
    for source in (tmp_path / "pre", tmp_path / "pub" / "model.pt"):
        pipe = MicroDiTPipeline.load(source, device="cpu")
        assert pipe.edm.sigma_data == 0.5, source
        assert pipe.text_encoder.name == "minilm" and pipe.codec.name == "pixels"
        assert np.array_equal(pipe.images(prompts, **kw), expected), source
    # raw weights by default; they are the run's model weights, not its EMA
    export(demo_run, tmp_path / "raw")
    state = load_checkpoint(resolve_checkpoint(demo_run))
    raw = MicroDiT.from_pretrained(tmp_path / "raw").state_dict()
    assert all(torch.equal(raw[k], state["model"][k]) for k in raw)
    assert any(not torch.equal(raw[k], state["ema"]["shadow"][k]) for k in raw)
    # and through the CLI: export, then generate from the export alone
    for args in (["export", str(demo_run), "--to", str(tmp_path / "cli"), "--ema"],
                 ["generate", str(tmp_path / "cli"), *prompts, "--steps", "2", "--guidance", "3", "--seed", "3",
                  "--device", "cpu", "--out", str(tmp_path / "img")]):
        r = subprocess.run([sys.executable, "-m", "microdit.cli", *args], env=ENV, capture_output=True, text=True,
                           timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
    made = np.stack([np.asarray(Image.open(tmp_path / "img" / f"{i}_0.png")) for i in range(2)])
    assert np.array_equal(made, expected)
