"""A scripted person for experiment 3: "make this region <colour>, leave the rest as it is".

The person looks at every sample of a round and marks each pixel (SPEC §7.3: a reward map and a
weight map): inside the region, the closer the pixel is to the wanted colour the more it is
liked (:class:`~pxpo_ext.rewards.ColourReward` in target mode, ``-d / sqrt(3)``); outside it,
the closer to the original image the more it is liked. Grading each sample is what makes the
feedback informative: the same marks on every sample carry no expected gradient, because the
samples' own log-likelihood gradients average to zero.
"""
from __future__ import annotations

import math

import torch

from ..judge import detect_objects, segment_colours
from ..rewards import ColourReward, RewardOutput, check_images
from ..scenes import COLOURS, parse_caption

NAME = "scripted_person"


class RegionColourPerson:
    """Reward ``(B, H, W)`` with full weight: closeness to ``colour`` in ``region``, to ``original`` elsewhere.

    ``before_by_seed`` (optional): the initial model's image from each noise seed. A sample whose
    ``metadata["seed"]`` is in it is graded outside the region against the image from its own noise
    ("leave the rest as the model drew it") instead of ``original``, the image the person saw: samples
    from other noises then are not pushed toward that image's layout."""

    def __init__(self, region: torch.Tensor, colour: str, original: torch.Tensor, keep_outside: bool = True,
                 before_by_seed: dict[int, torch.Tensor] | None = None):
        if region.dim() != 2 or tuple(original.shape[-2:]) != tuple(region.shape):
            raise ValueError(f"the region {tuple(region.shape)} and the original image {tuple(original.shape)} "
                             "must have the same height and width")
        self.name = NAME
        self.region = region.float()
        self.original = original.float()
        self.keep_outside = keep_outside
        self.before_by_seed = {int(k): v.float() for k, v in (before_by_seed or {}).items()}
        self.toward = ColourReward(mode="target", target=colour)

    def __call__(self, images, prompts=None, metadata=None) -> RewardOutput:
        check_images(images, self.name)
        region = self.region.to(images.device)
        inside = self.toward(images)
        if not self.keep_outside:
            return RewardOutput(inside, weight=region.expand_as(inside).clone())
        before = self.original
        if self.before_by_seed:
            seeds = [(m or {}).get("seed") for m in (metadata or [{}] * images.shape[0])]
            before = torch.stack([self.before_by_seed.get(s, self.original) for s in seeds])
        keep = -(images - before.to(images.device)).norm(dim=1) / math.sqrt(3)
        return RewardOutput(region * inside + (1 - region) * keep)


def target_region(image: torch.Tensor, caption: str) -> tuple[torch.Tensor, str]:
    """The region a person would point at: the first object the caption names, where the judge finds it
    (else any object the judge finds, else a centred square a third of the image wide), and how it was found."""
    found = detect_objects(image)
    wanted = [tuple(o) for o in parse_caption(caption)["objects"]]
    for obj in found:
        if (obj["colour"], obj["shape"]) in wanted:
            return obj["mask"].float(), f"the {obj['colour']} {obj['shape']} the judge found"
    if found:
        obj = found[0]
        return obj["mask"].float(), f"the {obj['colour']} {obj['shape']} the judge found (not the caption's object)"
    height, width = image.shape[-2:]
    region = torch.zeros(height, width)
    region[height // 3:2 * height // 3, width // 3:2 * width // 3] = 1
    return region, "a centred square (the judge found no object)"


def extra_object(image: torch.Tensor, caption: str) -> tuple[torch.Tensor, str]:
    """The region a person would point at to remove what the prompt did not ask for: the first object the judge
    finds that is none of the caption's objects.

    Each named object is matched to one found object: first one of its colour and shape, then, for a named
    object still unmatched, one of its colour in another shape (the named object drawn in the wrong shape,
    which a person would not call extra)."""
    wanted = [tuple(o) for o in parse_caption(caption)["objects"]]
    unmatched = []
    for obj in detect_objects(image):
        if (obj["colour"], obj["shape"]) in wanted:
            wanted.remove((obj["colour"], obj["shape"]))
        else:
            unmatched.append(obj)
    for obj in unmatched:
        misdrawn = next((w for w in wanted if w[0] == obj["colour"]), None)
        if misdrawn is not None:
            wanted.remove(misdrawn)
            continue
        name = f"{obj['colour']} {obj['shape']}"
        return obj["mask"].float(), f"the {name} the judge found, which the caption does not name"
    raise ValueError(f"the judge finds nothing in this image beyond what {caption!r} names: choose another seed, "
                     "or point at a named object (--region object)")


def background_colour(caption: str) -> str:
    """The caption's plain background colour (what a removed object's pixels should become)."""
    background = parse_caption(caption)["background"]
    if len(background) != 1:
        raise ValueError(f"{caption!r} has a two-tone background ({' and '.join(background)}): name the colour the "
                         "region should take instead of 'background'")
    return background[0]


def region_colour(image: torch.Tensor, region: torch.Tensor) -> str:
    """The palette colour most of the region's pixels have (the judge's segmentation): asking for it is
    asking to keep the region as it is, the control of a "make this <colour>" run."""
    labels = torch.from_numpy(segment_colours(image))[region > 0.5]
    labels = labels[labels >= 0]
    if labels.numel() == 0:
        raise ValueError("no pixel of the region is near a palette colour")
    return list(COLOURS)[int(labels.mode().values)]


def objects_outside(image: torch.Tensor, region: torch.Tensor) -> list[str]:
    """The objects the judge finds mostly (more than half of their pixels) outside the region, as sorted
    ``"<colour> <shape>"`` names: what "leave the rest as it is" keeps, object by object."""
    inside = region > 0.5
    return sorted(f"{o['colour']} {o['shape']}" for o in detect_objects(image)
                  if (o["mask"] & inside).sum() * 2 < o["mask"].sum())


def background_half(image: torch.Tensor, half: str) -> tuple[torch.Tensor, str]:
    """The region a person would paint to recolour part of the background: the ``"top"`` or ``"bottom"``
    half of the canvas, less every object the judge finds (and a 2-pixel rim around each, where their
    edges blur into the background)."""
    if half not in ("top", "bottom"):
        raise ValueError(f"half must be 'top' or 'bottom', got {half!r}")
    height, width = image.shape[-2:]
    region = torch.zeros(height, width)
    rows = slice(0, height // 2) if half == "top" else slice(height // 2, height)
    region[rows] = 1
    objects = torch.zeros(height, width)
    for obj in detect_objects(image):
        objects = torch.maximum(objects, obj["mask"].float())
    rim = torch.nn.functional.max_pool2d(objects[None, None], kernel_size=5, stride=1, padding=2)[0, 0]
    return region * (1 - rim), f"the {half} half of the background (less {int(rim[rows].sum())} object pixels)"


def colour_fraction(image: torch.Tensor, region: torch.Tensor, colour: str) -> float:
    """Fraction of the region's pixels whose nearest palette colour (the judge's segmentation) is ``colour``."""
    labels = torch.from_numpy(segment_colours(image))
    inside = region > 0.5
    return float((labels[inside] == list(COLOURS).index(colour)).float().mean())


def outside_change(image: torch.Tensor, original: torch.Tensor, region: torch.Tensor) -> float:
    """RMS pixel change (``[0, 1]`` units) outside the region."""
    outside = region <= 0.5
    return float((image - original).pow(2).mean(dim=0)[outside].mean().sqrt())
