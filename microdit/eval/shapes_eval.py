"""ShapesEval: a GenEval-style compositional score for Shapes prompts, read analytically.

Each image is read without any learned model: the background is estimated from the border,
foreground connected components are labelled, and each component's colour (the palette colour
whose background-to-colour line passes closest to its interior), shape (least L1 error among
the renderer's own anti-aliased templates, placed from image moments and compared at a few
blurs), size and 3x3 cell are measured. Detections are matched to the objects the prompt names.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from microdit.data.shapes import (
    COLORS, CROSS_ARM, MAX_OBJECTS, SHAPES, SIZE_SCALES, SIZES, Scene, ShapeObject, caption,
    cell_position, parse_caption, sample_scene, shape_alpha,
)

CATEGORIES = ("single_object", "two_objects", "counting", "colors", "position",
              "color_attribution")

# Area of each template as a fraction of its extent squared, and how far the alpha centroid
# sits below the bounding-box centre (in extents); used to initialise the fit from moments.
_AREA = {"circle": np.pi / 4, "square": 1.0, "triangle": 0.5, "diamond": 0.5,
         "cross": 2 * CROSS_ARM - CROSS_ARM**2}
_CENTROID_DY = {"triangle": 1 / 6}
_BLURS = (0.0, 0.33, 0.67, 1.0)  # template blurs tried, in pixels at 32 px
_FAINT = 0.15  # alpha below this is texture or blur tail
_PALETTE_NAMES = tuple(COLORS)
_PALETTE = np.asarray([COLORS[c] for c in _PALETTE_NAMES], dtype=np.float32)


@dataclasses.dataclass(frozen=True)
class EvalPrompt:
    """One evaluation prompt, the category it was drawn for, and a scene that satisfies it."""

    category: str
    prompt: str
    scene: Scene


def eval_prompts(n: int = 600, seed: int = 0, max_objects: int = 2) -> list[EvalPrompt]:
    """A fixed list of n prompts balanced over CATEGORIES, deterministic in its arguments."""
    max_count = max(2, min(max_objects, MAX_OBJECTS))
    out = []
    for i in range(n):
        category = CATEGORIES[i % len(CATEGORIES)]
        rng = np.random.default_rng([seed, CATEGORIES.index(category), i // len(CATEGORIES)])
        while True:
            if category in ("single_object", "colors"):
                scene = sample_scene(rng, num_objects=1)
            elif category == "counting":
                scene = sample_scene(rng, num_objects=int(rng.integers(2, max_count + 1)),
                                     repeat_prob=1.0)
            else:
                scene = sample_scene(rng, num_objects=2, repeat_prob=0.0)
            shapes = {o.shape for o in scene.objects}
            colors = {o.color for o in scene.objects}
            # Two-object categories need two different shapes to name; attribution also needs
            # two different colours, or swapping them would go unnoticed.
            if category in ("two_objects", "position") and len(shapes) < 2:
                continue
            if category == "color_attribution" and (len(shapes) < 2 or len(colors) < 2):
                continue
            break
        out.append(EvalPrompt(category, caption(scene), scene))
    return out


def _to_uint8_images(images) -> list[np.ndarray]:
    """uint8 (H, W, 3) arrays from uint8 HWC arrays/lists or float [-1, 1] NCHW tensors/arrays."""
    if hasattr(images, "detach"):  # a torch tensor; avoid importing torch for numpy callers
        images = images.detach().float().cpu().numpy()
    if isinstance(images, np.ndarray):
        images = list(images) if images.ndim == 4 else [images]
    out = []
    for im in images:
        if hasattr(im, "detach"):
            im = im.detach().float().cpu().numpy()
        im = np.asarray(im)
        if im.ndim != 3:
            raise ValueError(f"expected a 3-D image, got shape {im.shape}")
        if im.shape[0] == 3 and im.shape[-1] != 3:
            im = im.transpose(1, 2, 0)
        if im.dtype != np.uint8:
            im = np.clip(np.rint((im.astype(np.float32) + 1) * 127.5), 0, 255).astype(np.uint8)
        out.append(im)
    return out


def background_noise(images, tolerance: float = 50.0) -> float:
    """Mean over images of the rms deviation (0-255 units) from the image's median colour of the
    pixels within `tolerance` of it in every channel: the grain a sampler leaves on a flat
    background (0 for the Shapes' own images; objects, far from the background, do not count)."""
    images = _to_uint8_images(images)
    if not images:
        raise ValueError("background_noise: no images")
    rms = []
    for im in images:
        px = im.reshape(-1, 3).astype(np.float64)
        dev = px - np.median(px, axis=0)
        near = np.abs(dev).max(axis=1) < tolerance
        rms.append(float(np.sqrt((dev[near] ** 2).mean())) if near.any() else float("nan"))
    return float(np.nanmean(rms))


def _two_tones(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    # Two-means along the main axis: stripes and checkers have two tones, noise a range of them.
    mean = pixels.mean(0)
    centered = pixels - mean
    axis = np.linalg.svd(centered, full_matrices=False)[2][0] if len(pixels) > 1 else np.zeros(3)
    proj = centered @ axis
    lo, hi = np.percentile(proj, 5), np.percentile(proj, 95)
    for _ in range(8):
        split = proj > (lo + hi) / 2
        if split.all() or not split.any():
            break
        lo, hi = proj[~split].mean(), proj[split].mean()
    return mean + lo * axis, mean + hi * axis


def _segment_distance(pixels: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Distance of each RGB pixel to the segment between two background tones."""
    d = b - a
    t = np.clip((pixels - a) @ d / max(float(d @ d), 1e-6), 0, 1)
    return np.linalg.norm(pixels - (a + t[..., None] * d), axis=-1)


def _alpha(pixels: np.ndarray, t0: np.ndarray, t1: np.ndarray, color: np.ndarray) -> np.ndarray:
    """Opacity of `color` over a background that varies between tones t0 and t1."""
    tone, ink = t1 - t0, color - t0
    cos = abs(float(tone @ ink)) / max(float(np.linalg.norm(tone) * np.linalg.norm(ink)), 1e-6)
    if np.linalg.norm(tone) > 4 and cos < 0.9:
        # pixel - t0 = u * tone + alpha * ink, linear in (u, alpha): texture drops out of alpha.
        basis = np.stack([tone, ink], axis=1)
        return ((pixels - t0) @ np.linalg.pinv(basis).T)[..., 1]
    # Texture along the ink direction (white or black on grey) cannot be told from opacity.
    bg = (t0 + t1) / 2
    return (pixels - bg) @ (color - bg) / max(float((color - bg) @ (color - bg)), 1e-6)


def _soft(alpha: np.ndarray) -> np.ndarray:
    return np.clip((alpha - _FAINT) / (1 - _FAINT), 0, 1)


def _label(mask: np.ndarray) -> np.ndarray:
    """8-connected component labels (0 = background) by min-label propagation."""
    h, w = mask.shape
    big = h * w + 1
    labels = np.where(mask, np.arange(1, h * w + 1).reshape(h, w), big)
    while True:
        p = np.pad(labels, 1, constant_values=big)
        nb = labels
        for dy in (0, 1, 2):
            for dx in (0, 1, 2):
                nb = np.minimum(nb, p[dy:dy + h, dx:dx + w])
        nb = np.where(mask, nb, big)
        # Pointer jumping (label := label of the pixel it names) shortens long chains.
        flat = nb.ravel()
        inside = flat < big
        flat[inside] = np.minimum(flat[inside], flat[flat[inside] - 1])
        if np.array_equal(nb, labels):
            break
        labels = nb
    labels = np.where(mask, labels, 0)
    _, inverse = np.unique(labels, return_inverse=True)
    return inverse.reshape(h, w)


def _grow(labels: np.ndarray, steps: int) -> np.ndarray:
    """Grow labelled regions into unlabelled pixels by `steps` 8-neighbour steps."""
    h, w = labels.shape
    for _ in range(steps):
        p = np.pad(labels, 1)
        nb = labels
        for dy in (0, 1, 2):
            for dx in (0, 1, 2):
                nb = np.maximum(nb, p[dy:dy + h, dx:dx + w])
        labels = np.where(labels == 0, nb, labels)
    return labels


def _blur_matrices(h: int, w: int, sigma: float):
    """(left, right) matrices applying a zero-padded Gaussian blur as left @ image @ right."""
    if sigma <= 0:
        return None

    def matrix(n):
        i = np.arange(n)
        k = np.exp(-((i[:, None] - i[None, :]) ** 2) / (2 * sigma**2))
        return (k / k.sum(0).max()).astype(np.float32)

    return matrix(h), matrix(w).T


def _match(needed: Sequence, found: Sequence, ok) -> bool:
    """Whether every needed item can be paired with a distinct found item (bipartite matching)."""
    owner = [-1] * len(found)

    def augment(i, seen):
        for j in range(len(found)):
            if j not in seen and ok(needed[i], found[j]):
                seen.add(j)
                if owner[j] < 0 or augment(owner[j], seen):
                    owner[j] = i
                    return True
        return False

    return all(augment(i, set()) for i in range(len(needed)))


class ShapesEval:
    """Analytic GenEval-style scorer for images generated from Shapes captions."""

    def __init__(self, min_area: float = 0.004, max_fit_error: float = 0.5,
                 min_threshold: float = 30.0, max_components: int = 16):
        self.min_area = min_area
        self.max_fit_error = max_fit_error
        self.min_threshold = min_threshold
        self.max_components = max_components
        self.size_threshold = float(np.sqrt(SIZE_SCALES["small"] * SIZE_SCALES["large"]))

    def detect(self, image) -> list[dict]:
        """Objects read from one image, largest first.

        Each is a dict: shape (None when no template fits), color, size, position, center
        ([x, y] as fractions of the image), extent (fraction of the shorter side), fit_error.
        """
        img = _to_uint8_images([image])[0].astype(np.float32)
        # Objects are at least 0.18 of the side, so 64 px shows them fully; area averaging down
        # to it keeps the cost of large images flat.
        f = min(img.shape[:2]) // 64
        if f >= 2:
            h, w = img.shape[0] // f, img.shape[1] // f
            img = img[: h * f, : w * f].reshape(h, f, w, f, 3).mean(axis=(1, 3))
        h, w = img.shape[:2]
        border = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]])
        # An object may reach the border; its pixels are the ones far from the median.
        d = np.linalg.norm(border - np.median(border, axis=0), axis=1)
        border = border[d <= np.percentile(d, 80) + 8]
        t0, t1 = _two_tones(border)
        spread = float(np.percentile(_segment_distance(border, t0, t1), 90))
        # Texture stays near the two-tone segment; an image whose border is far from it
        # (noise) gets a high threshold and so yields few or no objects.
        threshold = max(self.min_threshold, 2 * spread + 12)
        dist = _segment_distance(img, t0, t1)
        labels = _label(dist > threshold)
        ids, areas = np.unique(labels[labels > 0], return_counts=True)
        keep = [(a, i) for a, i in zip(areas, ids) if a >= max(3, self.min_area * h * w)]
        keep = sorted(keep, reverse=True)[: self.max_components]
        labels = np.where(np.isin(labels, [i for _, i in keep]), labels, 0)
        side = min(h, w)
        # Blurred edges reach past the thresholded mask; each object owns the pixels nearest it.
        margin = max(2, int(np.ceil(0.05 * side)))
        territory = _grow(labels, margin)
        bg = (t0 + t1) / 2
        found = []
        for _, lab in keep:
            comp = labels == lab
            d = dist[comp]
            pixels = img[comp]
            # The farthest half of a component is its interior, free of anti-aliased edges.
            core = pixels[d >= np.median(d)]
            v = np.median(core, axis=0) - bg
            # Blur blends small objects with the background, so their colour is read as the
            # palette colour whose bg-to-colour line passes closest, not the nearest colour.
            lines = _PALETTE - bg
            a = np.clip(lines @ v / np.maximum((lines * lines).sum(1), 1e-6), 0, 1)
            k = int(np.argmin(np.linalg.norm(v - a[:, None] * lines, axis=1)))
            fit = self._fit(img, comp, territory == lab, margin, (t0, t1), _PALETTE[k], side)
            color = _PALETTE_NAMES[k]
            if fit is not None:
                found.append(fit | {"color": color})
        return found

    def _fit(self, img, comp, own, margin, tones, rgb, side) -> dict | None:
        h, w = comp.shape
        ys, xs = np.nonzero(comp)
        y0, y1 = max(0, ys.min() - margin), min(h, ys.max() + margin + 1)
        x0, x1 = max(0, xs.min() - margin), min(w, xs.max() + margin + 1)
        alpha = _alpha(img[y0:y1, x0:x1], *tones, rgb)
        # Unclipped below 0 so background noise sums to ~0 instead of inflating the area.
        alpha = np.where(own[y0:y1, x0:x1], np.clip(alpha, -0.5, 1.0), 0.0)
        area = float(alpha.sum())
        if area <= 1.0:
            return None
        weight = np.maximum(alpha, 0)
        gy, gx = np.mgrid[y0:y1, x0:x1]
        my = float((weight * (gy + 0.5)).sum() / weight.sum())
        mx = float((weight * (gx + 0.5)).sum() / weight.sum())
        # Generated images are blurrier than renders: templates are compared at a few blurs.
        unit = side / 32
        blurs = [_blur_matrices(y1 - y0, x1 - x0, s * unit) for s in _BLURS]
        # Faint values (texture left in alpha, far blur tails) are ignored on both sides.
        target = _soft(alpha)
        total = float(target.sum())

        def fit(shape, scale, blur_ids):
            """(error, blur index) of the best blur, and the template's centre and extent."""
            extent = float(np.sqrt(area / _AREA[shape])) * scale
            cx, cy = mx, my - _CENTROID_DY.get(shape, 0.0) * extent
            sharp = shape_alpha(shape, cx - x0, cy - y0, extent, y1 - y0, x1 - x0)
            errors = []
            for i in blur_ids:
                cov = _soft(sharp if blurs[i] is None else blurs[i][0] @ sharp @ blurs[i][1])
                norm = max(total, float(cov.sum()), 1e-6)
                errors.append((float(np.abs(target - cov).sum()) / norm, i))
            return min(errors), cx, cy, extent

        fits = {s: fit(s, 1.0, range(len(blurs))) for s in SHAPES}
        shape = min(SHAPES, key=lambda s: fits[s][0])
        blur = fits[shape][0][1]
        # Only the winner's scale is refined (shapes drawn a little thin or fat): it sharpens
        # its error and extent but rarely flips the class.
        (err, _), cx, cy, extent = min(
            (fit(shape, scale, [blur]) for scale in (0.94, 1.0, 1.06)), key=lambda f: f[0])
        row = int(np.clip(cy / h * 3, 0, 2))
        col = int(np.clip(cx / w * 3, 0, 2))
        return {
            "shape": shape if err <= self.max_fit_error else None,
            "size": SIZES[1] if extent / side >= self.size_threshold else SIZES[0],
            "position": cell_position(row, col),
            "center": [cx / w, cy / h],
            "extent": extent / side,
            "fit_error": err,
        }

    def check(self, detected: Sequence[dict], objects: Sequence[ShapeObject]) -> dict:
        """Which categories apply to the named objects, and whether each passes."""

        def present(*attrs):
            return _match(objects, detected,
                          lambda o, d: all(getattr(o, a) == d[a] for a in attrs))

        n = len(objects)
        pairs = {(o.shape, o.color) for o in objects}
        checks = {
            "counting": len(detected) == n and present("shape"),
            "position": present("shape", "position"),
            "size": present("shape", "size"),
        }
        if n == 1:
            checks["single_object"] = present("shape")
        else:
            checks["two_objects"] = present("shape")
        # One (shape, colour) pair is a plain colour test; several must not swap colours.
        checks["colors" if len(pairs) == 1 else "color_attribution"] = present("shape", "color")
        return checks

    def score(self, images, prompts: Sequence[str]) -> dict:
        """GenEval-style accuracies per category, their mean ("overall"), per-prompt details, and
        the grain left on the backgrounds ("background_noise", `background_noise`; not in overall).

        images: uint8 (N, H, W, 3) arrays (or a list of (H, W, 3)), or float (N, 3, H, W) in
        [-1, 1] (torch or numpy); prompts: captions as written by `caption`.
        """
        images = _to_uint8_images(images)
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        scores = self.score_detections([self.detect(im) for im in images], prompts)
        scores["background_noise"] = background_noise(images)
        return scores

    def score_detections(self, detections: Sequence[Sequence[dict]],
                         prompts: Sequence[str]) -> dict:
        """`score` from detections already made by `detect` (to score several prompt sets)."""
        if len(detections) != len(prompts):
            raise ValueError(f"{len(detections)} detections but {len(prompts)} prompts")
        details = []
        totals = {c: [0, 0] for c in (*CATEGORIES, "size")}
        for detected, prompt in zip(detections, prompts):
            checks = self.check(detected, parse_caption(prompt))
            for c, ok in checks.items():
                totals[c][0] += int(ok)
                totals[c][1] += 1
            details.append({"prompt": prompt, "detected": list(detected),
                            "checks": {c: bool(v) for c, v in checks.items()}})
        acc = {c: (p / t if t else None) for c, (p, t) in totals.items()}
        scored = [acc[c] for c in CATEGORIES if acc[c] is not None]
        return {
            **{c: acc[c] for c in CATEGORIES},
            "overall": float(np.mean(scored)) if scored else None,
            "size": acc["size"],  # reported, but not part of overall (GenEval has no size task)
            "counts": {c: t for c, (_, t) in totals.items()},
            "details": details,
        }
