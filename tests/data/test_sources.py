"""Sources of captioned images: folder, manifest, webdataset tars, shapes; preprocessing; bad inputs."""
import io
import json
import tarfile

import numpy as np
import pytest
from PIL import Image

from microdit.data.sources import (
    FolderSource, Item, ManifestSource, ShapesSource, SkipItem, WebDatasetSource, center_crop_resize,
    decode_image, default_min_size, open_source, to_rgb,
)
from tests.data.shard_fixtures import BAD_FILES, image_bytes, make_image_folder, make_manifest, make_tar_shards


def _load_all(source, resolutions=(16,), min_size=8):
    items, skips = [], []
    for ref in source.refs():
        try:
            items.append(source.load(ref, resolutions, min_size))
        except SkipItem as e:
            skips.append((e.path, e.reason))
    return items, skips


def test_center_crop_keeps_the_middle_square():
    img = np.zeros((20, 40, 3), np.uint8)
    img[:, :10] = (255, 0, 0)   # left band: cropped away
    img[:, 30:] = (0, 0, 255)   # right band: cropped away
    img[:, 10:30] = (0, 255, 0)
    out = center_crop_resize(Image.fromarray(img), 20)
    assert out.shape == (20, 20, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, np.broadcast_to(np.array([0, 255, 0], np.uint8), (20, 20, 3)))
    tall = center_crop_resize(Image.fromarray(np.transpose(img, (1, 0, 2)).copy()), 10)
    assert tall.shape == (10, 10, 3) and (tall[..., 1] > 200).all()


def test_alpha_is_composited_on_white_and_no_flip():
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[:, :4] = (255, 0, 0, 255)  # opaque red on the left, transparent right half
    out = np.asarray(to_rgb(Image.fromarray(rgba, "RGBA")))
    assert (out[:, :4] == (255, 0, 0)).all() and (out[:, 4:] == 255).all()
    # The red stays on the left at the target size: no flips.
    small = decode_image(image_bytes(Image.fromarray(rgba, "RGBA"), "PNG"), "x", (4,), 2)[4]
    assert small[:, 0, 0].min() > 200 and small[:, 0, 1].max() < 60 and small[:, 3].min() > 200


def test_min_size_default_and_small_images_skipped():
    assert default_min_size((256,)) == 128 and default_min_size((16, 64)) == 32 and default_min_size((2,)) == 2
    with pytest.raises(SkipItem, match="too small: 1x1"):
        decode_image(image_bytes(Image.new("RGB", (1, 1)), "PNG"), "p", (16,), 8)
    assert decode_image(image_bytes(Image.new("RGB", (8, 12)), "PNG"), "p", (16,), 8)[16].shape == (16, 16, 3)


def test_folder_source_recursive_sorted_with_captions(tmp_path):
    good = make_image_folder(tmp_path / "f", n_good=6)
    src = open_source(str(tmp_path / "f"))
    assert isinstance(src, FolderSource)
    assert src.refs() == good
    items, skips = _load_all(src, (16, 32))
    assert not skips and len(items) == 6
    assert [it.key for it in items] == [g.rsplit(".", 1)[0] for g in good]
    for it in items:
        assert it.images[16].shape == (16, 16, 3) and it.images[32].shape == (32, 32, 3)
        assert it.caption.startswith("a picture number")  # stripped of its newline
    assert len(list(src)) == 6  # (key, raw, caption) iteration
    assert FolderSource(tmp_path / "f", num=2).refs() == good[:2]


def test_folder_bad_files_are_skipped_with_reasons(tmp_path):
    make_image_folder(tmp_path / "f", n_good=3, bad=True)
    items, skips = _load_all(FolderSource(tmp_path / "f"), (16,), default_min_size((16,)))
    assert len(items) == 3
    reasons = {p.rsplit("/", 1)[-1]: r for p, r in skips}
    assert set(reasons) == set(BAD_FILES)
    for name, word in BAD_FILES.items():
        assert word in reasons[name], (name, reasons[name])


@pytest.mark.parametrize("kind", ["jsonl", "csv"])
def test_manifest_source(tmp_path, kind):
    path, captions = make_manifest(tmp_path, kind)
    src = open_source(str(path))
    assert isinstance(src, ManifestSource)
    items, skips = _load_all(src)
    assert [it.caption for it in items] == captions
    assert items[0].key == "images/m0"
    reasons = [r for _, r in skips]
    assert any("not found" in r for r in reasons)
    if kind == "jsonl":
        assert any("bad JSON" in r for r in reasons)


def test_webdataset_tar_source(tmp_path):
    keys = make_tar_shards(tmp_path / "wds", n=7, per_tar=4)
    src = open_source(str(tmp_path / "wds"))
    assert isinstance(src, WebDatasetSource)
    items, skips = _load_all(src)
    assert [it.key for it in items] == keys
    # Items without a .txt take the caption from their .json.
    assert [it.caption for it in items] == [f"tar caption {int(k)}" for k in keys]
    reasons = sorted(r for _, r in skips)
    assert len(reasons) == 2 and "missing caption" in reasons[0] and "no image" in reasons[1]
    assert WebDatasetSource(tmp_path / "wds", num=3).refs()[-1].key == keys[2]


def test_truncated_tar_keeps_members_before_the_damage(tmp_path):
    make_tar_shards(tmp_path / "wds", n=4, per_tar=4)
    (tmp_path / "wds" / "99999.tar").unlink()
    tar = tmp_path / "wds" / "00000.tar"
    data = tar.read_bytes()
    with tarfile.open(tar) as tf:
        third = [m for m in tf.getmembers() if m.name.startswith("000000002")][0]
    tar.write_bytes(data[: third.offset_data + 10])  # cut inside item 2's image
    items, skips = _load_all(WebDatasetSource(tmp_path / "wds"))
    assert [it.key for it in items] == ["000000000", "000000001"]
    assert skips  # item 2 (and the lost rest) is reported, not fatal


def test_shapes_source_renders_each_resolution_natively():
    src = ShapesSource(3, seed=5)
    it = src.load(1, (16, 32), 1)
    from microdit.data.shapes import ShapesDataset

    np.testing.assert_array_equal(it.images[32], ShapesDataset(3, 32, seed=5)[1]["image"])
    np.testing.assert_array_equal(it.images[16], ShapesDataset(3, 16, seed=5)[1]["image"])
    assert it.caption == ShapesDataset(3, 16, seed=5)[1]["caption"] and isinstance(it, Item)


def test_open_source_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither 'shapes' nor an existing path"):
        open_source(str(tmp_path / "nope"))
    (tmp_path / "x.txt").write_text("")
    with pytest.raises(ValueError, match=".jsonl or .csv"):
        open_source(str(tmp_path / "x.txt"))
    with pytest.raises(ValueError, match="--num"):
        ShapesSource(-1)


def test_array_and_pil_inputs_decode():
    arr = np.full((20, 30, 3), 7, np.uint8)
    assert (decode_image(arr, "a", (10,), 5)[10] == 7).all()
    assert (decode_image(Image.fromarray(arr), "a", (10,), 5)[10] == 7).all()
    with pytest.raises(SkipItem, match="uint8"):
        decode_image(arr.astype(np.float32), "a", (10,), 5)
    with pytest.raises(SkipItem, match="decode"):
        decode_image(b"", "a", (10,), 5)
    with pytest.raises(SkipItem, match="decode"):
        decode_image(io.BytesIO(b"x").getvalue(), "a", (10,), 5)


def test_jpeg_draft_decoding_is_close_to_a_full_decode():
    rng = np.random.default_rng(0)
    base = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8))
    data = image_bytes(base.resize((800, 600), Image.Resampling.BICUBIC), "JPEG")
    fast = decode_image(data, "a", (32,), 16)[32].astype(int)
    with Image.open(io.BytesIO(data)) as im:
        full = center_crop_resize(im.convert("RGB"), 32).astype(int)
    assert np.abs(fast - full).mean() < 1.0


def test_shapes_source_options_tune_the_distribution():
    from microdit.data.sources import shapes_options

    assert shapes_options("shapes") == {}
    opts = shapes_options("shapes:textured=0,backgrounds=grey+slate,max_objects=1")
    assert opts == {"textured_fraction": 0.0, "background_colors": ("grey", "slate"), "max_objects": 1}
    src = open_source("shapes:textured=0,backgrounds=grey,max_objects=1", num=40, seed=2)
    scenes = [src._dataset(32).scene(i) for i in range(40)]
    assert all(s.background == "plain" and s.background_color == "grey" and len(s.objects) == 1 for s in scenes)
    assert src.describe()["options"] == {"textured_fraction": 0.0, "background_colors": ["grey"], "max_objects": 1}
    assert json.loads(json.dumps(src.describe())) == src.describe()  # what prepare records and compares
    # The default source is unchanged by the options machinery (same items as ShapesDataset's defaults).
    plain = open_source("shapes", num=3, seed=5)
    assert "options" not in plain.describe()
    assert shapes_options("shapes:jitter=0")["jitter"] == 0.0
    still = open_source("shapes:textured=0,jitter=0", num=20, seed=2)
    assert all(o.extent in (0.2, 0.3) for i in range(20) for o in still._dataset(32).scene(i).objects)
    with pytest.raises(ValueError, match="jitter must be in"):
        open_source("shapes:jitter=2", num=3)._dataset(32)
    with pytest.raises(ValueError, match="bad option 'colour=red'"):
        open_source("shapes:colour=red", num=3)
    with pytest.raises(ValueError, match="bad option 'textured'"):
        open_source("shapes:textured", num=3)
    with pytest.raises(ValueError, match="background colours"):
        open_source("shapes:backgrounds=pink", num=3)
    with pytest.raises(ValueError, match="textured_fraction"):
        open_source("shapes:textured=2", num=3)
