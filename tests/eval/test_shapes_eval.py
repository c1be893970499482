"""Tests for ShapesEval: near-perfect on the dataset's own images, near chance on wrong ones."""
import itertools
import json

import numpy as np
import pytest
from PIL import Image, ImageFilter

from microdit.data.shapes import (
    COLORS, SHAPES, SIZES, Scene, ShapeObject, ShapesDataset, caption, render,
)
from microdit.eval.shapes_eval import CATEGORIES, ShapesEval, eval_prompts

N = 120  # prompts per resolution; 20 per category


@pytest.fixture(scope="module")
def evaluator():
    return ShapesEval()


@pytest.fixture(scope="module")
def own32(evaluator):
    prompts = eval_prompts(N, seed=11, max_objects=3)
    images = [render(p.scene, 32) for p in prompts]
    return prompts, images, [evaluator.detect(im) for im in images]


def test_eval_prompts_are_balanced_and_fixed():
    prompts = eval_prompts(60, seed=0)
    assert [p.category for p in prompts].count("counting") == 10
    assert {p.category for p in prompts} == set(CATEGORIES)
    assert [p.prompt for p in prompts] == [p.prompt for p in eval_prompts(60, seed=0)]
    for p in prompts:
        assert p.prompt == caption(p.scene)
        shapes = {o.shape for o in p.scene.objects}
        if p.category in ("two_objects", "position", "color_attribution"):
            assert len(p.scene.objects) == 2 and len(shapes) == 2
        if p.category == "counting":
            assert len(p.scene.objects) >= 2 and len(shapes) == 1


def test_own_images_32px(evaluator, own32):
    prompts, _, detections = own32
    result = evaluator.score_detections(detections, [p.prompt for p in prompts])
    for c in (*CATEGORIES, "size"):
        assert result[c] >= 0.95, (c, result[c])
    assert result["overall"] >= 0.97


def test_own_images_64px_and_textured_dataset(evaluator):
    prompts = eval_prompts(72, seed=12, max_objects=3)
    result = evaluator.score([render(p.scene, 64) for p in prompts], [p.prompt for p in prompts])
    for c in (*CATEGORIES, "size"):
        assert result[c] >= 0.97, (c, result[c])
    # Training items: every background kind, random object counts.
    ds = ShapesDataset(40, resolution=32, seed=4, textured_fraction=0.5)
    items = [ds[i] for i in range(len(ds))]
    result = evaluator.score(np.stack([it["image"] for it in items]),
                             [it["caption"] for it in items])
    assert result["overall"] >= 0.95


def test_own_images_256px(evaluator):
    prompts = eval_prompts(12, seed=13, max_objects=4)
    result = evaluator.score([render(p.scene, 256) for p in prompts], [p.prompt for p in prompts])
    assert result["overall"] == 1.0


def test_shuffled_prompts_score_near_chance(evaluator, own32):
    prompts, _, detections = own32
    order = np.random.default_rng(0).permutation(len(prompts))
    result = evaluator.score_detections(detections, [prompts[i].prompt for i in order])
    assert result["overall"] <= 0.3
    assert max(result[c] for c in CATEGORIES) <= 0.5


@pytest.mark.parametrize("kind", ["uniform", "gaussian", "blank"])
def test_noise_and_blank_images_score_zero(evaluator, kind):
    rng = np.random.default_rng(1)
    shape = (24, 32, 32, 3)
    images = {
        "uniform": lambda: rng.integers(0, 256, shape, dtype=np.uint8),
        "gaussian": lambda: np.clip(rng.normal(128, 40, shape), 0, 255).astype(np.uint8),
        "blank": lambda: np.full(shape, 128, dtype=np.uint8),
    }[kind]()
    prompts = [p.prompt for p in eval_prompts(len(images), seed=2)]
    result = evaluator.score(images, prompts)
    assert result["overall"] <= 0.05


def test_mild_blur_and_noise_are_tolerated(evaluator, own32):
    prompts, images, _ = own32
    prompts, images = prompts[:60], images[:60]
    rng = np.random.default_rng(3)
    degraded = []
    for im in images:
        blurred = np.asarray(Image.fromarray(im).filter(ImageFilter.GaussianBlur(0.5)), float)
        degraded.append(np.clip(np.rint(blurred + rng.normal(0, 6, im.shape)), 0, 255)
                        .astype(np.uint8))
    result = evaluator.score(degraded, [p.prompt for p in prompts])
    assert result["overall"] >= 0.9


def test_every_shape_colour_and_size_is_read_at_32px(evaluator):
    for shape, color, size in itertools.product(SHAPES, COLORS, SIZES):
        scene = Scene([ShapeObject(shape, color, size, "center")], background_color="slate")
        (found,) = evaluator.detect(render(scene, 32))
        assert (found["shape"], found["color"], found["size"], found["position"]) == \
            (shape, color, size, "center")


def test_checks_catch_swapped_colours_and_missing_objects(evaluator):
    a = ShapeObject("circle", "red", "large", "left")
    b = ShapeObject("square", "blue", "small", "top right")
    prompt = caption(Scene([a, b]))
    swapped = Scene([ShapeObject("circle", "blue", "large", "left"),
                     ShapeObject("square", "red", "small", "top right")])
    moved = Scene([ShapeObject("circle", "red", "large", "bottom"), b])
    images = [render(s, 64) for s in (Scene([a, b]), swapped, Scene([a]), moved)]
    checks = [d["checks"] for d in evaluator.score(images, [prompt] * 4)["details"]]
    assert all(checks[0].values())
    assert checks[1]["two_objects"] and not checks[1]["color_attribution"]
    assert checks[1]["position"]
    assert not checks[2]["two_objects"] and not checks[2]["counting"]
    assert checks[3]["two_objects"] and not checks[3]["position"]


def test_accepts_float_tensors_and_is_json_serialisable(evaluator):
    torch = pytest.importorskip("torch")
    prompts = eval_prompts(12, seed=5)
    images = np.stack([render(p.scene, 32) for p in prompts])
    as_tensor = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    texts = [p.prompt for p in prompts]
    a, b = evaluator.score(images, texts), evaluator.score(as_tensor, texts)
    assert json.loads(json.dumps(a)) == json.loads(json.dumps(b))
    assert a["overall"] == 1.0
    assert a["counts"]["single_object"] == 4 and len(a["details"]) == 12
    with pytest.raises(ValueError):
        evaluator.score(images[:3], texts)


def test_background_noise_reads_the_grain_on_a_flat_background(evaluator):
    from microdit.eval.shapes_eval import background_noise

    rng = np.random.default_rng(0)
    flat = np.full((4, 32, 32, 3), 128, np.uint8)
    flat[:, 8:20, 8:20] = (220, 30, 30)  # an object far from the background: not counted
    assert background_noise(flat) == 0.0
    grainy = np.clip(np.rint(flat + rng.normal(0, 6, flat.shape)), 0, 255).astype(np.uint8)
    assert 5.5 < background_noise(grainy) < 6.5
    prompts = [p.prompt for p in eval_prompts(4, seed=0)]
    scores = evaluator.score(grainy, prompts)
    assert scores["background_noise"] == pytest.approx(background_noise(grainy))
    assert "background_noise" not in scores["counts"]  # reported, not a category of overall
    with pytest.raises(ValueError, match="no images"):
        background_noise([])
