"""Shapes: a procedural captioned dataset of coloured shapes on a 3x3 grid, any resolution.

A scene is described in resolution-free units (centres and extents are fractions of the image
side), so one scene renders consistently at 32, 64 or 256 pixels. Captions are compositional
English generated from the scene and parsed back by `parse_caption`, which the analytic
evaluator (`microdit.eval.shapes_eval`) uses to read prompts.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Sequence

import numpy as np
from PIL import Image

SHAPES = ("circle", "square", "triangle", "diamond", "cross")
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles",
           "diamond": "diamonds", "cross": "crosses"}

# Saturated colours plus white and black: every pair is > 100 apart in RGB and every one is
# > 100 away from every background colour below, so nearest-palette reading is unambiguous.
COLORS = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 60, 220),
    "yellow": (245, 225, 40),
    "purple": (140, 40, 190),
    "orange": (245, 125, 0),
    "white": (250, 250, 250),
    "black": (15, 15, 15),
}

# Muted greyish tones that no object uses, so the background never reads as an object colour.
BACKGROUND_COLORS = {
    "grey": (128, 128, 128),
    "light grey": (168, 168, 164),
    "dark grey": (88, 88, 92),
    "beige": (160, 150, 128),
    "slate": (104, 116, 132),
    "sage": (122, 136, 112),
    "taupe": (142, 124, 120),
}
BACKGROUND_KINDS = ("plain", "noise", "stripes", "checker")
TEXTURE_AMPLITUDE = 9.0  # per channel; low enough that texture stays far below object contrast

SIZES = ("small", "large")
# Extent (bounding-box side) as a fraction of the image side; small is still ~6 px at 32 px.
SIZE_SCALES = {"small": 0.2, "large": 0.3}
SIZE_JITTER = 0.06

POSITIONS = ("top left", "top", "top right", "left", "center", "right",
             "bottom left", "bottom", "bottom right")
POSITION_PHRASES = {
    "top left": "at the top left", "top": "at the top", "top right": "at the top right",
    "left": "on the left", "center": "in the center", "right": "on the right",
    "bottom left": "at the bottom left", "bottom": "at the bottom",
    "bottom right": "at the bottom right",
}
COUNT_WORDS = ("a", "two", "three", "four")
MAX_OBJECTS = len(COUNT_WORDS)

CENTER_JITTER = 0.05  # keeps every centre >= 0.11 of the side inside its cell
EDGE_MARGIN = 0.02
MIN_GAP = 0.06  # >= 2 px at 32 px, so anti-aliased edges of neighbours never touch
CROSS_ARM = 0.4  # arm width as a fraction of the extent


def position_cell(position: str) -> tuple[int, int]:
    """(row, col) of a named position in the 3x3 grid."""
    i = POSITIONS.index(position)
    return i // 3, i % 3


def cell_position(row: int, col: int) -> str:
    """Named position of a (row, col) grid cell."""
    return POSITIONS[3 * row + col]


@dataclasses.dataclass(frozen=True)
class ShapeObject:
    """One object; geometry (fractions of the side) defaults to the cell centre, nominal size."""

    shape: str
    color: str
    size: str
    position: str
    center: tuple[float, float] | None = None
    extent: float | None = None

    def __post_init__(self):
        for value, allowed in ((self.shape, SHAPES), (self.color, COLORS),
                               (self.size, SIZES), (self.position, POSITIONS)):
            if value not in allowed:
                raise ValueError(f"{value!r} is not one of {allowed}")

    @property
    def key(self) -> tuple[str, str, str, str]:
        """The attributes a caption states: (shape, color, size, position)."""
        return (self.shape, self.color, self.size, self.position)

    def geometry(self) -> tuple[float, float, float]:
        """(cx, cy, extent) as fractions of the image side."""
        if self.center is None:
            row, col = position_cell(self.position)
            cx, cy = (col + 0.5) / 3, (row + 0.5) / 3
        else:
            cx, cy = self.center
        return cx, cy, SIZE_SCALES[self.size] if self.extent is None else self.extent


@dataclasses.dataclass(frozen=True)
class Scene:
    """Objects on a plain or low-contrast textured background."""

    objects: tuple[ShapeObject, ...]
    background: str = "plain"
    background_color: str = "grey"
    texture_seed: int = 0
    texture_period: float = 0.125  # fraction of the image side
    texture_angle: float = 0.0  # degrees, for stripes

    def __post_init__(self):
        object.__setattr__(self, "objects", tuple(self.objects))
        if self.background not in BACKGROUND_KINDS:
            raise ValueError(f"background {self.background!r} is not one of {BACKGROUND_KINDS}")
        if self.background_color not in BACKGROUND_COLORS:
            raise ValueError(f"background colour {self.background_color!r} is unknown")


def _separated(a: tuple[float, float, float], b: tuple[float, float, float]) -> bool:
    # Axis-aligned boxes with a gap on at least one axis cannot overlap or touch.
    half = (a[2] + b[2]) / 2 + MIN_GAP
    return abs(a[0] - b[0]) >= half or abs(a[1] - b[1]) >= half


def _place(rng: np.random.Generator, position: str, extent: float,
           jitter: float = 1.0) -> tuple[float, float]:
    row, col = position_cell(position)
    lo, hi = EDGE_MARGIN + extent / 2, 1 - EDGE_MARGIN - extent / 2
    j = CENTER_JITTER * jitter
    cx = float(np.clip((col + 0.5) / 3 + rng.uniform(-j, j), lo, hi))
    cy = float(np.clip((row + 0.5) / 3 + rng.uniform(-j, j), lo, hi))
    return cx, cy


def _check_jitter(jitter: float) -> float:
    if not 0.0 <= jitter <= 1.0:
        raise ValueError(f"jitter must be in [0, 1] (a fraction of the default position and size "
                         f"jitter), got {jitter!r}")
    return float(jitter)


def background_choices(background_colors: Sequence[str] | None = None) -> list[str]:
    """The background colour names to draw from (default: all of BACKGROUND_COLORS), checked."""
    backgrounds = list(BACKGROUND_COLORS) if background_colors is None else list(background_colors)
    if not backgrounds or any(b not in BACKGROUND_COLORS for b in backgrounds):
        raise ValueError(f"background colours must be a non-empty list of {tuple(BACKGROUND_COLORS)}, "
                         f"got {background_colors!r}")
    return backgrounds


def sample_scene(rng: np.random.Generator, max_objects: int = 2, textured_fraction: float = 0.3,
                 num_objects: int | None = None, repeat_prob: float = 0.2,
                 background_colors: Sequence[str] | None = None, jitter: float = 1.0) -> Scene:
    """Random scene of 1..max_objects non-overlapping objects in distinct cells.

    background_colors: the background colours to draw from (default: all of BACKGROUND_COLORS).
    jitter: the fraction of the default centre and size jitter (CENTER_JITTER, SIZE_JITTER) to
    draw; 0 puts every object at its cell centre at its nominal size, so a plain-background
    scene is fixed by its caption (pairs of large objects in neighbouring cells cannot then be
    separated and are not drawn).
    """
    backgrounds = background_choices(background_colors)
    jitter = _check_jitter(jitter)
    if not 1 <= max_objects <= MAX_OBJECTS:
        raise ValueError(f"max_objects must be in 1..{MAX_OBJECTS}")
    n = int(rng.integers(1, max_objects + 1)) if num_objects is None else num_objects
    if not 1 <= n <= MAX_OBJECTS:
        raise ValueError(f"num_objects must be in 1..{MAX_OBJECTS}")
    # Scenes of identical objects teach count phrasing ("two small red circles ...").
    repeat = n > 1 and rng.random() < repeat_prob
    for _ in range(1000):
        cells = sorted(int(c) for c in rng.choice(len(POSITIONS), size=n, replace=False))
        if repeat:
            attrs = [(rng.choice(SHAPES), rng.choice(list(COLORS)), rng.choice(SIZES))] * n
        else:
            attrs = [(rng.choice(SHAPES), rng.choice(list(COLORS)), rng.choice(SIZES))
                     for _ in range(n)]
        sj = SIZE_JITTER * jitter
        extents = [SIZE_SCALES[a[2]] * rng.uniform(1 - sj, 1 + sj) for a in attrs]
        # Retry only the jitter first, so neighbouring large objects are not starved.
        for _ in range(20 if jitter > 0 else 1):
            geoms = [(*_place(rng, POSITIONS[c], e, jitter), e) for c, e in zip(cells, extents)]
            if all(_separated(geoms[i], geoms[j]) for i in range(n) for j in range(i)):
                break
        else:
            continue
        order = rng.permutation(n)
        objects = tuple(ShapeObject(str(attrs[i][0]), str(attrs[i][1]), str(attrs[i][2]),
                                    POSITIONS[cells[i]], (geoms[i][0], geoms[i][1]),
                                    float(geoms[i][2])) for i in order)
        break
    else:
        raise RuntimeError("could not place non-overlapping objects")
    textured = rng.random() < textured_fraction
    return Scene(
        objects=objects,
        background=str(rng.choice(BACKGROUND_KINDS[1:])) if textured else "plain",
        background_color=str(rng.choice(backgrounds)),
        texture_seed=int(rng.integers(0, 2**31 - 1)),
        texture_period=float(rng.uniform(0.08, 0.16)),
        texture_angle=float(rng.choice([0.0, 45.0, 90.0, 135.0])),
    )


def _group(objects: Sequence[ShapeObject]) -> list[tuple[tuple[str, str, str], list[str]]]:
    groups: dict[tuple[str, str, str], list[str]] = {}
    for o in objects:
        groups.setdefault((o.shape, o.color, o.size), []).append(o.position)
    return [(k, sorted(v, key=POSITIONS.index)) for k, v in groups.items()]


def _join(parts: Sequence[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def caption(scene: Scene | Sequence[ShapeObject]) -> str:
    """Deterministic compositional caption; identical objects are counted ("two small ...s")."""
    objects = scene.objects if isinstance(scene, Scene) else scene
    if not objects:
        raise ValueError("a scene needs at least one object")
    parts = []
    for (shape, color, size), positions in _group(objects):
        if len(positions) > MAX_OBJECTS:
            raise ValueError(f"at most {MAX_OBJECTS} identical objects can be counted")
        noun = shape if len(positions) == 1 else PLURALS[shape]
        where = _join([POSITION_PHRASES[p] for p in positions])
        parts.append(f"{COUNT_WORDS[len(positions) - 1]} {size} {color} {noun} {where}")
    return _join(parts)


_NOUNS = {**{s: s for s in SHAPES}, **{p: s for s, p in PLURALS.items()}}
_HEAD = re.compile(r"\b({})\s+({})\s+({})\s+({})\b".format(
    "|".join(COUNT_WORDS), "|".join(SIZES), "|".join(COLORS),
    "|".join(sorted(_NOUNS, key=len, reverse=True))))
_PHRASE_TO_POSITION = {v: k for k, v in POSITION_PHRASES.items()}
_WHERE = re.compile("|".join(
    re.escape(p) for p in sorted(_PHRASE_TO_POSITION, key=len, reverse=True)))


def parse_caption(text: str) -> list[ShapeObject]:
    """Objects named by a caption from `caption` (its inverse, up to geometry and object order)."""
    text = " ".join(text.lower().strip().rstrip(".").split())
    heads = list(_HEAD.finditer(text))
    if not heads:
        raise ValueError(f"not a Shapes caption: {text!r}")
    objects = []
    for i, h in enumerate(heads):
        tail = text[h.end(): heads[i + 1].start() if i + 1 < len(heads) else len(text)]
        positions = [_PHRASE_TO_POSITION[m.group(0)] for m in _WHERE.finditer(tail)]
        count = COUNT_WORDS.index(h.group(1)) + 1
        if len(positions) != count:
            raise ValueError(
                f"{h.group(0)!r} names {count} object(s) at {len(positions)} position(s)")
        objects += [ShapeObject(_NOUNS[h.group(4)], h.group(3), h.group(2), p) for p in positions]
    return objects


def _inside(shape: str, x: np.ndarray, y: np.ndarray, r: float) -> np.ndarray:
    """Whether points (offsets from the centre, y down) lie in a shape of half-extent r."""
    ax, ay = np.abs(x), np.abs(y)
    if shape == "circle":
        return x * x + y * y <= r * r
    if shape == "square":
        return (ax <= r) & (ay <= r)
    if shape == "triangle":  # apex up, base along the bottom of the box
        return (y <= r) & (ax <= (y + r) / 2)
    if shape == "diamond":
        return ax + ay <= r
    if shape == "cross":
        t = CROSS_ARM * r
        return ((ax <= t) & (ay <= r)) | ((ay <= t) & (ax <= r))
    raise ValueError(f"unknown shape {shape!r}")


def shape_alpha(shape: str, cx: float, cy: float, extent: float, height: int, width: int,
                supersample: int = 8) -> np.ndarray:
    """Anti-aliased coverage in [0, 1], float32 (height, width), of a shape in pixel units.

    Pixel (i, j) spans [j, j+1) x [i, i+1). Coverage is the fraction of supersample x
    supersample exact point tests inside the shape, with no rounding of the geometry, so the
    evaluator can fit these same templates at sub-pixel offsets.
    """
    out = np.zeros((height, width), dtype=np.float32)
    r = extent / 2
    y0, y1 = max(0, int(np.floor(cy - r))), min(height, int(np.ceil(cy + r)))
    x0, x1 = max(0, int(np.floor(cx - r))), min(width, int(np.ceil(cx + r)))
    if y0 >= y1 or x0 >= x1:
        return out
    offsets = (np.arange(supersample) + 0.5) / supersample
    ys = (np.arange(y0, y1)[:, None] + offsets).ravel() - cy
    xs = (np.arange(x0, x1)[:, None] + offsets).ravel() - cx
    inside = _inside(shape, xs[None, :], ys[:, None], r)
    cov = inside.reshape(y1 - y0, supersample, x1 - x0, supersample).sum(axis=(1, 3))
    out[y0:y1, x0:x1] = cov / supersample**2
    return out


def _background(scene: Scene, resolution: int) -> np.ndarray:
    base = np.asarray(BACKGROUND_COLORS[scene.background_color], dtype=np.float32)
    if scene.background == "plain":
        return np.broadcast_to(base, (resolution, resolution, 3)).copy()
    # Coordinates in image-side units keep the texture the same at every resolution.
    u = (np.arange(resolution, dtype=np.float32) + 0.5) / resolution
    yy, xx = np.meshgrid(u, u, indexing="ij")
    period = scene.texture_period
    if scene.background == "noise":
        rng = np.random.default_rng(scene.texture_seed)
        grid = rng.uniform(-1, 1, size=(8, 8)).astype(np.float32)
        pattern = np.asarray(Image.fromarray(grid, mode="F").resize(
            (resolution, resolution), Image.BICUBIC))
        pattern = np.clip(pattern, -1, 1)
    elif scene.background == "stripes":
        a = np.deg2rad(scene.texture_angle)
        pattern = np.sin(2 * np.pi * (xx * np.cos(a) + yy * np.sin(a)) / period)
    else:
        pattern = np.where((np.floor(xx / period) + np.floor(yy / period)) % 2 == 0, 1.0, -1.0)
    return base + TEXTURE_AMPLITUDE * pattern[..., None].astype(np.float32)


def render(scene: Scene, resolution: int) -> np.ndarray:
    """Render a scene to a uint8 (resolution, resolution, 3) RGB array."""
    if resolution < 8:
        raise ValueError("resolution must be at least 8")
    image = _background(scene, resolution)
    for o in scene.objects:
        cx, cy, extent = o.geometry()
        alpha = shape_alpha(o.shape, cx * resolution, cy * resolution, extent * resolution,
                            resolution, resolution)[..., None]
        image = image * (1 - alpha) + np.asarray(COLORS[o.color], dtype=np.float32) * alpha
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


class ShapesDataset:
    """Captioned Shapes images; item i depends only on (seed, i), so any order or shard agrees."""

    def __init__(self, num: int, resolution: int = 32, seed: int = 0, max_objects: int = 2,
                 textured_fraction: float = 0.3, background_colors: Sequence[str] | None = None,
                 jitter: float = 1.0):
        if num < 0:
            raise ValueError("num must be non-negative")
        if not 0.0 <= textured_fraction <= 1.0:
            raise ValueError(f"textured_fraction must be in [0, 1], got {textured_fraction}")
        if not 1 <= max_objects <= MAX_OBJECTS:
            raise ValueError(f"max_objects must be in 1..{MAX_OBJECTS}, got {max_objects}")
        self.num, self.resolution, self.seed = num, resolution, seed
        self.max_objects, self.textured_fraction = max_objects, textured_fraction
        self.background_colors = None if background_colors is None else tuple(background_choices(background_colors))
        self.jitter = _check_jitter(jitter)

    def __len__(self) -> int:
        return self.num

    def scene(self, index: int) -> Scene:
        """The scene of item `index`, without rendering it."""
        if not -self.num <= index < self.num:
            raise IndexError(index)
        index %= self.num
        rng = np.random.default_rng([self.seed, index])
        return sample_scene(rng, self.max_objects, self.textured_fraction,
                            background_colors=self.background_colors, jitter=self.jitter)

    def __getitem__(self, index: int) -> dict:
        scene = self.scene(index)
        return {"image": render(scene, self.resolution), "caption": caption(scene), "scene": scene}
