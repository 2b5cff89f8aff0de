"""A procedural generator of captioned scenes with per-pixel ground truth.

Each scene is one or two flat-coloured shapes on a plain or two-tone background, with a
caption such as ``"a red circle and a blue square on a yellow background"`` and one boolean
mask per object. Everything is a pure function of ``(seed, index)``, so scene ``i`` of a
generator is the same whether it is drawn alone or in a batch, on any machine.

Conventions the captions follow (and :func:`parse_caption` inverts):

- two-tone backgrounds are split into a top and a bottom half; ``"on a yellow and blue
  background"`` means yellow on top, blue below;
- objects are named in the order they were drawn, each as ``"a <colour> <shape>"``;
- an object's colour differs from the other object's and from the background colour(s), so
  every named colour is visible.

The embedded model (:mod:`pxpo_ext.embedded`) is trained on these scenes and
:mod:`pxpo_ext.judge` checks generated images against their captions.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import numpy as np
import torch

# Well separated in RGB so that a nearest-colour segmentation of a generated image is robust.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 70, 220),
    "yellow": (240, 210, 40),
    "white": (245, 245, 245),
    "black": (25, 25, 25),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star")

# Half-extent of a shape as a fraction of the image side: 7.7 to 14 pixels at 64x64.
SIZE_RANGE = (0.12, 0.22)
TWO_TONE_PROBABILITY = 0.25
TWO_OBJECT_PROBABILITY = 0.5


@dataclass
class Scene:
    image: torch.Tensor  # (3, H, W) float32 in [0, 1]
    caption: str
    background: tuple[str, ...]  # one colour name, or (top, bottom) for a two-tone background
    objects: list[dict] = field(default_factory=list)  # shape, colour, bbox (x0, y0, x1, y1), size, mask (H, W) bool

    def masks_by_shape(self) -> dict[str, torch.Tensor]:
        return masks_by_shape(self)

    def label_map(self) -> torch.Tensor:
        """(H, W) int64: 0 for background, ``1 + SHAPES.index(shape)`` on each object's pixels."""
        labels = torch.zeros(self.image.shape[1:], dtype=torch.int64)
        for obj in self.objects:
            labels[obj["mask"]] = 1 + SHAPES.index(obj["shape"])
        return labels


@dataclass
class Scenes:
    images: torch.Tensor  # (N, 3, H, W)
    captions: list[str]
    scenes: list[Scene]

    def __len__(self) -> int:
        return len(self.scenes)

    def __getitem__(self, i: int) -> Scene:
        return self.scenes[i]


def masks_by_shape(scene: Scene) -> dict[str, torch.Tensor]:
    """Union of the object masks of each shape in ``SHAPES`` ((H, W) bool; all False if absent)."""
    height, width = scene.image.shape[1:]
    out = {shape: torch.zeros(height, width, dtype=torch.bool) for shape in SHAPES}
    for obj in scene.objects:
        out[obj["shape"]] |= obj["mask"]
    return out


def _polygon_mask(vertices: np.ndarray, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Even-odd point-in-polygon test of the pixel centres ``(xs, ys)``."""
    inside = np.zeros(xs.shape, dtype=bool)
    x0, y0 = vertices[:, 0], vertices[:, 1]
    x1, y1 = np.roll(x0, -1), np.roll(y0, -1)
    for ax, ay, bx, by in zip(x0, y0, x1, y1):
        crosses = (ay > ys) != (by > ys)
        with np.errstate(divide="ignore", invalid="ignore"):
            x_cross = ax + (ys - ay) * (bx - ax) / (by - ay)
        inside ^= crosses & (xs < x_cross)
    return inside


def _fit_box(vertices: np.ndarray, cx: float, cy: float, half: float) -> np.ndarray:
    """Scale and move a polygon so its bounding box has height ``2 * half`` and centre ``(cx, cy)``."""
    lo, hi = vertices.min(0), vertices.max(0)
    scaled = (vertices - (lo + hi) / 2) * (2 * half / (hi - lo)[1])
    return scaled + np.array([cx, cy])


def shape_mask(shape: str, cx: float, cy: float, half: float, height: int, width: int) -> np.ndarray:
    """(H, W) bool mask of ``shape`` centred at ``(cx, cy)`` with half-extent ``half`` pixels."""
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float64) + 0.5
    if shape == "circle":
        return (xs - cx) ** 2 + (ys - cy) ** 2 <= half**2
    if shape == "square":
        return (np.abs(xs - cx) <= half) & (np.abs(ys - cy) <= half)
    if shape == "triangle":  # apex up, base as wide as the triangle is tall
        vertices = np.array([[0.0, -1.0], [1.0, 1.0], [-1.0, 1.0]])
    elif shape == "star":  # five points, inner radius half the outer one, one point up
        angles = -math.pi / 2 + np.arange(10) * math.pi / 5
        radii = np.where(np.arange(10) % 2 == 0, 1.0, 0.5)
        vertices = np.stack([radii * np.cos(angles), radii * np.sin(angles)], 1)
    else:
        raise ValueError(f"unknown shape {shape!r}; choose one of {', '.join(SHAPES)}")
    return _polygon_mask(_fit_box(vertices, cx, cy, half), xs, ys)


def make_caption(objects: list[tuple[str, str]], background: tuple[str, ...]) -> str:
    """``[("red", "circle"), ("blue", "square")], ("yellow",)`` -> ``"a red circle and a blue square on a yellow background"``."""
    things = " and ".join(f"a {colour} {shape}" for colour, shape in objects)
    return f"{things} on a {' and '.join(background)} background"


_CAPTION = re.compile(r"^(?P<things>.+) on an? (?P<background>.+) background$")
_THING = re.compile(r"^an? (?P<colour>\w+) (?P<shape>\w+)$")


def parse_caption(caption: str) -> dict:
    """Invert :func:`make_caption`: ``{"objects": [(colour, shape), ...], "background": (colour, ...)}``."""
    match = _CAPTION.match(caption.strip().lower())
    if match is None:
        raise ValueError(
            f"caption {caption!r} does not follow the scene grammar "
            "'a <colour> <shape>[ and a <colour> <shape>] on a <colour>[ and <colour>] background'"
        )
    background = tuple(match["background"].split(" and "))
    objects = []
    for part in match["things"].split(" and "):
        thing = _THING.match(part)
        if thing is None or thing["colour"] not in COLOURS or thing["shape"] not in SHAPES:
            raise ValueError(
                f"caption {caption!r}: {part!r} is not 'a <colour> <shape>' with a colour in "
                f"{sorted(COLOURS)} and a shape in {list(SHAPES)}"
            )
        objects.append((thing["colour"], thing["shape"]))
    if not 1 <= len(background) <= 2 or any(c not in COLOURS for c in background):
        raise ValueError(f"caption {caption!r}: background must be one or two colours from {sorted(COLOURS)}")
    return {"objects": objects, "background": background}


class SceneGenerator:
    """Deterministic scenes: ``sample(i)`` depends only on ``(seed, i)`` and the options."""

    def __init__(self, image_size: int = 64, seed: int = 0, max_objects: int = 2, two_tone: bool = True):
        if image_size < 16:
            raise ValueError(f"image_size={image_size} is too small to draw shapes; use 16 or more")
        if max_objects not in (1, 2):
            raise ValueError(f"max_objects={max_objects}; scenes hold 1 or 2 objects")
        self.image_size = image_size
        self.seed = seed
        self.max_objects = max_objects
        self.two_tone = two_tone

    def _layout(self, rng: np.random.Generator) -> tuple[tuple[str, ...], list[tuple[str, str, float, float, float]]]:
        names = list(COLOURS)
        n_background = 2 if self.two_tone and rng.random() < TWO_TONE_PROBABILITY else 1
        background = tuple(rng.choice(names, size=n_background, replace=False).tolist())
        n_objects = 2 if self.max_objects == 2 and rng.random() < TWO_OBJECT_PROBABILITY else 1
        free = [c for c in names if c not in background]
        colours = rng.choice(free, size=n_objects, replace=False).tolist()
        # A large first shape near the centre can leave no room for a second one (about 1 scene in 30,000):
        # then the shapes are placed afresh, from the same generator, so the scene is still a function of (seed, i)
        # and every scene placed at the first try is unchanged.
        for _ in range(100):
            placed = self._place(rng, colours)
            if placed is not None:
                return background, placed
        raise RuntimeError(f"no room for {len(colours)} shapes in a {self.image_size}x{self.image_size} image; "
                           "raise image_size")

    def _place(self, rng: np.random.Generator, colours: list[str]) -> list[tuple[str, str, float, float, float]] | None:
        """Shapes and positions of ``colours`` that keep a 2-pixel gap, or None if one did not fit."""
        size = self.image_size
        placed: list[tuple[str, str, float, float, float]] = []
        for colour in colours:
            shape = SHAPES[rng.integers(len(SHAPES))]
            for attempt in range(1000):  # rejection sampling of a position that keeps a 2-pixel gap
                half = rng.uniform(*SIZE_RANGE) * size if attempt < 100 else SIZE_RANGE[0] * size
                cx, cy = rng.uniform(half + 1, size - half - 1, size=2)
                if all(abs(cx - ox) > half + oh + 2 or abs(cy - oy) > half + oh + 2 for _, _, ox, oy, oh in placed):
                    break
            else:
                return None
            placed.append((colour, shape, float(cx), float(cy), float(half)))
        return placed

    def sample(self, index: int) -> Scene:
        rng = np.random.default_rng([self.seed, index])
        background, placed = self._layout(rng)
        size = self.image_size
        palette = {name: np.array(rgb, dtype=np.float32) / 255.0 for name, rgb in COLOURS.items()}
        image = np.empty((size, size, 3), dtype=np.float32)
        image[:] = palette[background[0]]
        if len(background) == 2:
            image[size // 2 :] = palette[background[1]]
        objects = []
        for colour, shape, cx, cy, half in placed:
            mask = shape_mask(shape, cx, cy, half, size, size)
            image[mask] = palette[colour]
            rows, cols = np.nonzero(mask)
            objects.append({
                "shape": shape,
                "colour": colour,
                "bbox": (int(cols.min()), int(rows.min()), int(cols.max()) + 1, int(rows.max()) + 1),
                "size": half / size,
                "mask": torch.from_numpy(mask),
            })
        caption = make_caption([(o["colour"], o["shape"]) for o in objects], background)
        return Scene(torch.from_numpy(image).permute(2, 0, 1).contiguous(), caption, background, objects)

    def generate(self, n: int, start: int = 0) -> Scenes:
        scenes = [self.sample(i) for i in range(start, start + n)]
        return Scenes(torch.stack([s.image for s in scenes]), [s.caption for s in scenes], scenes)


def prompts(n: int | None = None, seed: int = 0, max_objects: int = 2, two_tone: bool = True) -> list[str]:
    """Captions for training or RL.

    With ``n=None``, every caption of one object on a plain background (and, when
    ``max_objects=2``, of two objects on a plain background), sorted; with ``n``, the captions
    of the first ``n`` scenes of ``SceneGenerator(seed=seed, ...)``'s distribution.
    """
    if n is not None:
        gen = SceneGenerator(seed=seed, max_objects=max_objects, two_tone=two_tone)
        layouts = [gen._layout(np.random.default_rng([seed, i])) for i in range(n)]
        return [make_caption([(colour, shape) for colour, shape, *_ in placed], background) for background, placed in layouts]
    out = []
    for background in COLOURS:
        free = [c for c in COLOURS if c != background]
        for c1 in free:
            for s1 in SHAPES:
                out.append(make_caption([(c1, s1)], (background,)))
                if max_objects == 2:
                    out.extend(make_caption([(c1, s1), (c2, s2)], (background,))
                               for c2 in free if c2 != c1 for s2 in SHAPES)
    return sorted(out)
