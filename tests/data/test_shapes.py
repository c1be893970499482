"""Tests for the procedural Shapes dataset: determinism, captions, rendering, geometry."""
import itertools

import numpy as np
import pytest

from microdit.data.shapes import (
    BACKGROUND_COLORS, BACKGROUND_KINDS, COLORS, POSITIONS, SHAPES, SIZES, Scene, ShapeObject,
    ShapesDataset, caption, parse_caption, position_cell, render, sample_scene, shape_alpha,
)


def _keys(objects):
    return sorted(o.key for o in objects)


def test_item_depends_only_on_seed_and_index():
    a = ShapesDataset(40, resolution=32, seed=7)
    b = ShapesDataset(1000, resolution=32, seed=7)  # a different length must not matter
    forward = [a[i] for i in range(40)]
    backward = [b[i] for i in reversed(range(40))][::-1]
    for x, y in zip(forward, backward):
        assert x["caption"] == y["caption"]
        assert x["scene"] == y["scene"]
        np.testing.assert_array_equal(x["image"], y["image"])
    assert a[-1]["caption"] == a[39]["caption"]
    other = ShapesDataset(40, resolution=32, seed=8)
    assert [other[i]["caption"] for i in range(40)] != [x["caption"] for x in forward]


def test_index_out_of_range():
    ds = ShapesDataset(3)
    with pytest.raises(IndexError):
        ds[3]


def test_caption_examples():
    two = Scene([ShapeObject("circle", "red", "small", "top left"),
                 ShapeObject("square", "blue", "large", "bottom right")])
    assert caption(two) == ("a small red circle at the top left and "
                            "a large blue square at the bottom right")
    counted = Scene([ShapeObject("circle", "red", "small", "right"),
                     ShapeObject("triangle", "green", "large", "center"),
                     ShapeObject("circle", "red", "small", "top left")])
    assert caption(counted) == ("two small red circles at the top left and on the right and "
                                "a large green triangle in the center")
    three = Scene([ShapeObject("cross", "white", "small", "left"),
                   ShapeObject("diamond", "black", "large", "top"),
                   ShapeObject("square", "yellow", "small", "bottom")])
    assert caption(three) == ("a small white cross on the left, a large black diamond at the top "
                              "and a small yellow square at the bottom")


@pytest.mark.parametrize("max_objects", [1, 2, 4])
def test_captions_parse_back_to_the_scene(max_objects):
    rng = np.random.default_rng(0)
    for _ in range(200):
        scene = sample_scene(rng, max_objects=max_objects)
        text = caption(scene)
        assert text == caption(scene)
        assert _keys(parse_caption(text)) == _keys(scene.objects)
        assert _keys(parse_caption(text.upper() + ".")) == _keys(scene.objects)


def test_parse_caption_rejects_other_text():
    with pytest.raises(ValueError):
        parse_caption("a photo of a cat")
    with pytest.raises(ValueError):
        parse_caption("two small red circles at the top left")  # one position for two


def test_every_attribute_value_is_sampled():
    scenes = [ShapesDataset(400, seed=1, max_objects=4).scene(i) for i in range(400)]
    objects = [o for s in scenes for o in s.objects]
    assert {o.shape for o in objects} == set(SHAPES)
    assert {o.color for o in objects} == set(COLORS)
    assert {o.size for o in objects} == set(SIZES)
    assert {o.position for o in objects} == set(POSITIONS)
    assert {len(s.objects) for s in scenes} == {1, 2, 3, 4}
    assert {s.background for s in scenes} == set(BACKGROUND_KINDS)


def test_palette_is_well_separated():
    colors = np.array(list(COLORS.values()), dtype=float)
    backgrounds = np.array(list(BACKGROUND_COLORS.values()), dtype=float)
    between = np.linalg.norm(colors[:, None] - colors[None], axis=-1)
    assert between[~np.eye(len(colors), dtype=bool)].min() > 100
    assert np.linalg.norm(colors[:, None] - backgrounds[None], axis=-1).min() > 100


@pytest.mark.parametrize("resolution", [32, 64, 256])
def test_render_any_resolution(resolution):
    scene = Scene([ShapeObject("square", "red", "large", "top left"),
                   ShapeObject("circle", "blue", "small", "bottom right")],
                  background_color="beige")
    image = render(scene, resolution)
    assert image.shape == (resolution, resolution, 3) and image.dtype == np.uint8
    at = lambda fx, fy: tuple(image[int(fy * resolution), int(fx * resolution)])  # noqa: E731
    assert at(1 / 6, 1 / 6) == COLORS["red"]
    assert at(5 / 6, 5 / 6) == COLORS["blue"]
    assert at(0.5, 0.5) == BACKGROUND_COLORS["beige"]
    assert tuple(image[0, -1]) == BACKGROUND_COLORS["beige"]


def test_small_objects_survive_32px():
    for shape, color in itertools.product(SHAPES, COLORS):
        alpha = shape_alpha(shape, 16, 16, 0.2 * 32, 32, 32)
        # At least a few fully covered pixels, so the colour is readable at 32 px.
        assert (alpha >= 0.99).sum() >= 9, shape
        image = render(Scene([ShapeObject(shape, color, "small", "center")]), 32)
        assert (np.abs(image.astype(int) - COLORS[color]).sum(-1) == 0).sum() >= 9


def test_shape_alpha_area_matches_geometry():
    expected = {"circle": np.pi / 4, "square": 1.0, "triangle": 0.5, "diamond": 0.5,
                "cross": 0.64}
    for shape, fraction in expected.items():
        area = shape_alpha(shape, 40.3, 39.7, 50, 80, 80).sum()
        assert area == pytest.approx(fraction * 50 * 50, rel=0.01), shape


def test_plain_and_textured_backgrounds():
    plain = ShapesDataset(30, resolution=64, seed=3, textured_fraction=0.0)
    textured = ShapesDataset(30, resolution=64, seed=3, textured_fraction=1.0)
    for i in range(30):
        p, t = plain[i], textured[i]
        assert p["scene"].background == "plain" and t["scene"].background != "plain"
        assert len({tuple(px) for px in p["image"][0]}) == 1  # top row is one colour
        border = np.concatenate([t["image"][0], t["image"][:, 0]]).astype(float)
        base = BACKGROUND_COLORS[t["scene"].background_color]
        assert border.std(0).max() > 1  # visibly textured
        assert np.abs(border - base).max() <= 10  # but low contrast
        assert not any(tuple(px) in COLORS.values() for px in p["image"][0])


def test_objects_never_overlap_and_stay_in_their_cells():
    ds = ShapesDataset(300, resolution=64, seed=5, max_objects=4)
    for i in range(len(ds)):
        scene = ds.scene(i)
        assert len({o.position for o in scene.objects}) == len(scene.objects)
        for o in scene.objects:
            cx, cy, extent = o.geometry()
            assert (int(cy * 3), int(cx * 3)) == position_cell(o.position)
            assert 0 < cx - extent / 2 and cx + extent / 2 < 1
            assert 0 < cy - extent / 2 and cy + extent / 2 < 1
        alphas = [shape_alpha(o.shape, *(np.array(o.geometry()) * 64), 64, 64)
                  for o in scene.objects]
        for a, b in itertools.combinations(alphas, 2):
            assert (a * b).max() == 0
            # A clear gap: neighbours' anti-aliased edges never share a pixel or touch one.
            assert not (np.pad(a > 0, 1)[1:-1, 1:-1] & _dilate(b > 0)).any()


def _dilate(mask):
    p = np.pad(mask, 1)
    h, w = mask.shape
    return np.any([p[dy:dy + h, dx:dx + w] for dy in range(3) for dx in range(3)], axis=0)


def test_sample_scene_arguments():
    rng = np.random.default_rng(2)
    scene = sample_scene(rng, num_objects=3, repeat_prob=1.0)
    assert len({(o.shape, o.color, o.size) for o in scene.objects}) == 1
    assert caption(scene).startswith("three ")
    with pytest.raises(ValueError):
        sample_scene(rng, max_objects=5)
    with pytest.raises(ValueError):
        ShapeObject("heart", "red", "small", "top")


def test_jitter_zero_puts_objects_at_cell_centres_at_nominal_size():
    from microdit.data.shapes import SIZE_SCALES, position_cell

    ds = ShapesDataset(300, seed=4, max_objects=2, textured_fraction=0.0, background_colors=["grey"],
                       jitter=0.0)
    seen_two = 0
    for i in range(300):
        scene = ds.scene(i)
        seen_two += len(scene.objects) == 2
        for o in scene.objects:
            row, col = position_cell(o.position)
            lo, hi = 0.02 + o.extent / 2, 1 - 0.02 - o.extent / 2  # EDGE_MARGIN
            want = (min(max((col + 0.5) / 3, lo), hi), min(max((row + 0.5) / 3, lo), hi))
            assert o.center == pytest.approx(want) and o.extent == SIZE_SCALES[o.size]
    assert seen_two > 100  # pairs are still drawn (those that fit without jitter)
    # A plain scene is then fixed by its caption: the same caption renders the same pixels.
    images = {}
    for i in range(300):
        item = ds[i]
        if item["caption"] in images:
            assert np.array_equal(images[item["caption"]], item["image"])
        images[item["caption"]] = item["image"]


def test_jitter_one_is_the_default_distribution_and_bad_jitter_is_refused():
    a, b = ShapesDataset(50, seed=3), ShapesDataset(50, seed=3, jitter=1.0)
    assert all(a.scene(i) == b.scene(i) for i in range(50))
    half = ShapesDataset(200, seed=3, jitter=0.5)
    for i in range(200):
        for o in half.scene(i).objects:
            row, col = divmod(["top left", "top", "top right", "left", "center", "right", "bottom left",
                               "bottom", "bottom right"].index(o.position), 3)
            assert abs(o.center[0] - (col + 0.5) / 3) <= 0.025 + 0.02 + 1e-9
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match="jitter must be in"):
            ShapesDataset(5, jitter=bad)
