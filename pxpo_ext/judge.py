"""Judge whether an image shows what its scene caption says, from the scene generator's ground truth.

A generated image is segmented by nearest palette colour (:data:`pxpo_ext.scenes.COLOURS`);
each connected region of one colour is classified as a shape by two scale-free features,
how much of its bounding box it fills and how much of its convex hull it fills, against the
mean features of the generator's own masks (the prototypes). Then, for a caption such as
``"a red circle and a blue square on a yellow background"``:

- the background matches when the most frequent colour of the image (of its top and bottom
  halves, for a two-tone background) is the named one;
- a named object appears when a region of its colour, of a plausible size, is classified as
  its shape. When it does not, :attr:`Judgement.outcomes` says why (:data:`OUTCOMES`):
  another shape, no region of a plausible size, or no pixel of its colour at all;
  :func:`outcome_shares` counts them over many judgements.

On the generator's own images the judge scores 100% (``tests/test_scenes.py`` checks it).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from .scenes import COLOURS, SHAPES, SIZE_RANGE, SceneGenerator, parse_caption

_NAMES = list(COLOURS)
LABELS = {name: i for i, name in enumerate(_NAMES)}  # colour name -> its label in segment_colours' maps
_PALETTE = np.array([COLOURS[n] for n in _NAMES], dtype=np.float32) / 255.0
# A pixel farther than this (RGB distance in [0, 1] units) from every palette colour is left
# unlabelled: blurred edges and off-palette smudges count for no colour.
MAX_COLOUR_DISTANCE = 0.3


# Why a named object was or was not found, from best to worst: a region of its colour and of a
# plausible size has its shape / has another shape (or none: too thin) / regions of its colour
# exist but none has a plausible size / no pixel has its colour.
OUTCOMES = ("found", "wrong shape", "wrong size", "colour absent")


@dataclass
class Judgement:
    caption: str
    background_ok: bool
    outcomes: list[str]  # one of OUTCOMES per object named in the caption, in caption order

    @property
    def objects_ok(self) -> list[bool]:
        return [outcome == "found" for outcome in self.outcomes]

    @property
    def all_ok(self) -> bool:
        return self.background_ok and all(self.objects_ok)


def _as_hwc(image) -> np.ndarray:
    array = image.detach().float().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image, dtype=np.float32)
    if array.ndim != 3 or 3 not in (array.shape[0], array.shape[-1]):
        raise ValueError(f"expected one RGB image (3, H, W) or (H, W, 3) in [0, 1]; got shape {array.shape}")
    return np.moveaxis(array, 0, -1) if array.shape[0] == 3 else array


def segment_colours(image) -> np.ndarray:
    """(H, W) int64: index into ``list(COLOURS)`` of each pixel's nearest palette colour, -1 if none is near."""
    rgb = _as_hwc(image)
    distance = np.linalg.norm(rgb[:, :, None, :] - _PALETTE[None, None], axis=-1)
    labels = distance.argmin(-1)
    labels[distance.min(-1) > MAX_COLOUR_DISTANCE] = -1
    return labels


def connected_components(mask: np.ndarray) -> list[np.ndarray]:
    """The 8-connected regions of a boolean (H, W) mask, as boolean masks (shape tips touch diagonally)."""
    height, width = mask.shape
    big = height * width
    ids = np.where(mask, np.arange(big).reshape(height, width), big)
    while True:  # propagate the smallest id through each region until nothing changes
        padded = np.pad(ids, 1, constant_values=big)
        neighbours = [padded[1 + dy:1 + dy + height, 1 + dx:1 + dx + width] for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
        nxt = np.where(mask, np.minimum.reduce(neighbours), big)
        if np.array_equal(nxt, ids):
            break
        ids = nxt
    return [ids == i for i in np.unique(ids[mask])]


def _hull_area(points: np.ndarray) -> float:
    """Area of the convex hull of 2-D points (Andrew's monotone chain, then the shoelace formula)."""
    pts = sorted(set(map(tuple, points.tolist())))
    if len(pts) < 3:
        return 0.0

    def half(seq):
        chain: list = []
        for p in seq:
            while len(chain) >= 2 and (chain[-1][0] - chain[-2][0]) * (p[1] - chain[-2][1]) - (chain[-1][1] - chain[-2][1]) * (p[0] - chain[-2][0]) <= 0:
                chain.pop()
            chain.append(p)
        return chain[:-1]

    hull = np.array(half(pts) + half(pts[::-1]), dtype=np.float64)
    x, y = hull[:, 0], hull[:, 1]
    return 0.5 * abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))


def shape_features(mask: np.ndarray) -> np.ndarray:
    """(fill of bounding box, fill of convex hull, short/long side of bounding box) of one region."""
    rows, cols = np.nonzero(mask)
    height, width = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
    area = float(len(rows))
    corners = np.concatenate([np.stack([cols + dx, rows + dy], 1) for dx in (0, 1) for dy in (0, 1)])
    return np.array([area / (height * width), area / _hull_area(corners), min(height, width) / max(height, width)])


@lru_cache(maxsize=1)
def shape_prototypes() -> dict[str, np.ndarray]:
    """Mean features of each shape over the masks of 200 generator scenes (seed 0)."""
    features: dict[str, list] = {shape: [] for shape in SHAPES}
    gen = SceneGenerator(image_size=64, seed=0)
    for i in range(200):
        for obj in gen.sample(i).objects:
            features[obj["shape"]].append(shape_features(obj["mask"].numpy()))
    return {shape: np.mean(f, axis=0)[:2] for shape, f in features.items()}


def classify_shape(mask: np.ndarray) -> str | None:
    """The shape a region looks like, or None when it is no plausible shape (too thin)."""
    fill, solidity, aspect = shape_features(mask)
    if aspect < 0.6:
        return None
    prototypes = shape_prototypes()
    return min(prototypes, key=lambda s: float(np.sum((np.array([fill, solidity]) - prototypes[s]) ** 2)))


def _area_range(height: int, width: int) -> tuple[float, float]:
    """Plausible object areas in pixels: half the smallest star to 1.5 times the largest square."""
    side = min(height, width)
    smallest = 0.4 * (2 * SIZE_RANGE[0] * side) ** 2
    largest = (2 * SIZE_RANGE[1] * side) ** 2
    return 0.5 * smallest, 1.5 * largest


def colour_regions(labels: np.ndarray, colour: str) -> tuple[bool, list[tuple[np.ndarray, str | None]]]:
    """(whether any pixel of ``labels`` (:func:`segment_colours`) has ``colour``, [(region, its shape or None)
    for its connected regions of plausible size]); the regions are (H, W) bool masks."""
    low, high = _area_range(*labels.shape)
    regions = connected_components(labels == LABELS[colour])
    return bool(regions), [(r, classify_shape(r)) for r in regions if low <= r.sum() <= high]


def detect_objects(image) -> list[dict]:
    """Every plausible object in an image: dicts of ``colour``, ``shape`` and ``mask`` ((H, W) bool tensor)."""
    labels = segment_colours(image)
    return [{"colour": colour, "shape": shape, "mask": torch.from_numpy(region)}
            for colour in _NAMES for region, shape in colour_regions(labels, colour)[1] if shape is not None]


def _outcome(labels: np.ndarray, colour: str, shape: str) -> str:
    present, regions = colour_regions(labels, colour)
    if not present:
        return "colour absent"
    if not regions:
        return "wrong size"
    return "found" if shape in {found for _, found in regions} else "wrong shape"


def _mode(labels: np.ndarray) -> int:
    values, counts = np.unique(labels[labels >= 0], return_counts=True)
    return int(values[counts.argmax()]) if len(values) else -1


def judge(image, caption: str) -> Judgement:
    """Does ``image`` ((3, H, W) in [0, 1]) show ``caption``? See the module docstring for the rules."""
    spec = parse_caption(caption)
    labels = segment_colours(image)
    background = [LABELS[c] for c in spec["background"]]
    if len(background) == 1:
        background_ok = _mode(labels) == background[0]
    else:
        middle = labels.shape[0] // 2
        background_ok = _mode(labels[:middle]) == background[0] and _mode(labels[middle:]) == background[1]
    return Judgement(caption, background_ok, [_outcome(labels, colour, shape) for colour, shape in spec["objects"]])


def judge_batch(images, captions: list[str]) -> list[Judgement]:
    if len(images) != len(captions):
        raise ValueError(f"{len(images)} images but {len(captions)} captions; pass one caption per image")
    return [judge(image, caption) for image, caption in zip(images, captions)]


def fidelity(judgements: list[Judgement]) -> dict[str, float]:
    """Rates over a set of judgements: background, named objects (each counted), and whole captions."""
    objects = [ok for j in judgements for ok in j.objects_ok]
    return {
        "background": float(np.mean([j.background_ok for j in judgements])),
        "objects": float(np.mean(objects)),
        "all": float(np.mean([j.all_ok for j in judgements])),
        "n": len(judgements),
    }


def outcome_shares(judgements: list[Judgement]) -> dict[str, float]:
    """The share of named objects (each counted) with each of :data:`OUTCOMES`; they sum to 1."""
    outcomes = [outcome for j in judgements for outcome in j.outcomes]
    return {name: outcomes.count(name) / max(1, len(outcomes)) for name in OUTCOMES}
