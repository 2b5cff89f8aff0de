"""Scene alignment: per-pixel feedback on whether an image draws what its scene caption asks.

For the embedded model's captions (``"a red circle and a yellow star on a white background"``,
:mod:`pxpo_ext.scenes`), each pixel is labelled with its nearest palette colour and each
connected region of a named object's colour is classified as a shape, as the judge does
(:mod:`pxpo_ext.judge`). Then, per pixel:

- in a region of a named object's colour that has a plausible size and the named shape:
  ``+min(1, object_area / region area)``, so a correct object earns up to ``object_area`` (by
  default the median object area of the scene generator) and drawing it larger earns nothing more;
- a named object that was not found costs ``object_area`` in all: ``-min(1, object_area / area)``
  on the pixels of its colour outside correct regions (another shape, implausible size,
  fragments), and what is left, when they cover less than ``object_area``, spread evenly over the
  named background. A misshapen object and an erased one cost the same, so erasing is no escape;
- other pixels of a named object's colour (fragments beside a correct object): ``-1``;
- in a palette colour the caption does not name: ``-1``;
- in the named background colour: ``0``, less a missing object's share;
- near no palette colour (blurred edges): weight 0, no feedback.

The feedback says where an image is wrong where it can: a misshapen object or a stray colour is
marked where it is drawn, an absent object (which has no place) on the whole background. Unlike
"less blue", no image scores better than one that shows its caption, and unlike
``examples/caption_colours.py`` the objects must be there and of the right shape. The price is a
reward built from the judge itself, so the judge's rates of a model trained on it show what it
learned rather than an independent check. It is not local either (a pixel's value depends on its
whole region), which PXPO's per-pixel estimator assumes: in one of two long runs PXPO grew and
merged the objects (docs/rewards.md, "Keep per-pixel rewards local"); DDPO treats it as a scalar.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

from ..judge import LABELS, colour_regions, segment_colours
from ..scenes import SceneGenerator, parse_caption
from .base import RewardError, RewardOutput, check_images, register_reward


@lru_cache(maxsize=1)
def generator_object_area() -> float:
    """Median object area of the scene generator, as a fraction of the image (200 scenes, seed 0)."""
    gen = SceneGenerator(image_size=64, seed=0)
    return float(np.median([float(o["mask"].float().mean()) for i in range(200) for o in gen.sample(i).objects]))


def alignment_map(image: torch.Tensor, caption: str, object_area: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(reward, weight)`` maps ``(H, W)`` of one image ``(3, H, W)`` for its caption (module docstring)."""
    scene = parse_caption(caption)
    labels = segment_colours(image)
    reward = np.zeros(labels.shape, np.float32)
    named = {LABELS[c] for c in scene["background"]} | {LABELS[c] for c, _ in scene["objects"]}
    reward[(labels >= 0) & ~np.isin(labels, list(named))] = -1.0
    nominal = object_area * labels.size
    debt = 0.0  # what missing objects cost beyond their wrong pixels, spread over the background
    for colour in {c for c, _ in scene["objects"]}:
        shapes = {s for c, s in scene["objects"] if c == colour}
        wrong = labels == LABELS[colour]
        found = set()
        for region, shape in colour_regions(labels, colour)[1]:
            if shape in shapes:
                reward[region] = min(1.0, nominal / region.sum())
                wrong &= ~region
                found.add(shape)
        # A missing object costs `nominal` in all, whether it was drawn wrong or not at all, so that
        # erasing a misshapen object gains nothing: first on its colour's wrong pixels, the rest on the background.
        missing = len(shapes - found) * nominal
        area = int(wrong.sum())
        if area:
            reward[wrong] = -min(1.0, missing / area) if missing else -1.0
        debt += max(0.0, missing - area)
    if debt:
        background = np.isin(labels, [LABELS[c] for c in scene["background"]])
        if not background.any():
            background = labels >= 0
        reward[background] -= min(1.0, debt / max(1, int(background.sum())))
    return torch.from_numpy(reward), torch.from_numpy((labels >= 0).astype(np.float32))


class SceneAlignmentReward:
    """Per-pixel scene alignment ``(B, 3, H, W)`` in ``[0, 1]`` -> reward and weight maps ``(B, H, W)``."""

    name = "scene_alignment"

    def __init__(self, object_area: float | None = None):
        if object_area is not None and not 0.0 < object_area <= 1.0:
            raise RewardError(f"reward function {self.name!r}: object_area={object_area} must be a fraction "
                              "of the image in (0, 1]")
        self.object_area = generator_object_area() if object_area is None else float(object_area)

    def __call__(self, images, prompts, metadata=None) -> RewardOutput:
        images = check_images(images, self.name)
        if len(prompts) != len(images):
            raise RewardError(f"reward function {self.name!r}: {len(images)} images but {len(prompts)} prompts")
        try:
            maps = [alignment_map(image, prompt, self.object_area) for image, prompt in zip(images.float().cpu(), prompts)]
        except ValueError as error:  # a prompt outside the scene grammar
            raise RewardError(f"reward function {self.name!r} scores only scene captions: {error}") from error
        return RewardOutput(reward=torch.stack([r for r, _ in maps]), weight=torch.stack([w for _, w in maps]))


@register_reward("scene_alignment")
def scene_alignment(object_area: float | None = None) -> SceneAlignmentReward:
    """Per-pixel alignment of a scene image with its caption (module docstring)."""
    return SceneAlignmentReward(object_area)
