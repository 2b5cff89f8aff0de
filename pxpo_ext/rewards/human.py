"""A person's feedback on one image: painted marks -> a reward map and a weight map (SPEC §7.3).

Marks are two masks in ``[0, 1]`` at image resolution, *liked* and *disliked*:

    R = liked - disliked          (+1 liked, -1 disliked, 0 where both or neither)
    W = max(liked, disliked)      (1 where painted, 0 where nothing was painted)

Soft masks (anti-aliased brush edges) give fractional values. pxpo normalises rewards over
the painted pixels, so a round of feedback needs both kinds of marks: with liked (or only
disliked) regions alone every painted pixel has the same reward and the advantages vanish.

Marks come from PNG files on disk (``like_mask``/``dislike_mask``: any PNG, painted where
luminance times alpha is above 0) or from the feedback web page, which sends one RGBA PNG
whose green channel is the liked paint and red channel the disliked paint.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .base import RewardError, RewardOutput, register_reward
from .base import check_images

MAX_MARK_PIXELS = 4096 * 4096  # refuse marks larger than this (decompression bombs, typos)


def _open_png(source, what: str) -> Image.Image:
    try:
        image = Image.open(io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source)
        if image.width * image.height > MAX_MARK_PIXELS:
            raise ValueError(f"{what} is {image.width}x{image.height}; marks larger than {MAX_MARK_PIXELS} pixels are refused")
        image.load()
    except (OSError, Image.DecompressionBombError) as error:
        raise ValueError(f"{what} is not a readable image ({error})") from None
    return image


def mask_from_png(path_or_bytes, what: str = "mask") -> torch.Tensor:
    """A ``(H, W)`` float mask in ``[0, 1]``: greyscale luminance times alpha (a black or transparent pixel is 0)."""
    image = _open_png(path_or_bytes, what).convert("LA")
    array = np.asarray(image, dtype=np.float32) / 255.0
    return torch.from_numpy(array[..., 0] * array[..., 1])


def marks_from_canvas_png(data: bytes) -> tuple[torch.Tensor, torch.Tensor]:
    """``(liked, disliked)`` masks from the web page's RGBA marks: green = liked, red = disliked, alpha = coverage."""
    array = np.asarray(_open_png(data, "the marks image").convert("RGBA"), dtype=np.float32) / 255.0
    alpha = array[..., 3]
    return torch.from_numpy(array[..., 1] * alpha), torch.from_numpy(array[..., 0] * alpha)


def marks_to_maps(liked: torch.Tensor | None, disliked: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(reward, weight)`` maps ``(H, W)`` from liked/disliked masks in ``[0, 1]`` (either may be None)."""
    masks = [m for m in (liked, disliked) if m is not None]
    if not masks:
        raise ValueError("feedback needs a liked mask, a disliked mask, or both")
    shape = masks[0].shape
    for name, mask in (("liked", liked), ("disliked", disliked)):
        if mask is None:
            continue
        if mask.dim() != 2 or mask.shape != shape:
            raise ValueError(f"the {name} mask has shape {tuple(mask.shape)}; both masks must be (H, W) of one size")
        if not bool(torch.isfinite(mask).all()) or bool((mask < 0).any() | (mask > 1).any()):
            raise ValueError(f"the {name} mask must hold finite values in [0, 1]")
    zero = torch.zeros(shape)
    liked = zero if liked is None else liked.float()
    disliked = zero if disliked is None else disliked.float()
    return liked - disliked, torch.maximum(liked, disliked)


def describe_marks(reward: torch.Tensor, weight: torch.Tensor) -> dict:
    """Fractions of the image painted liked and disliked (what the page and the logs report)."""
    total = weight.numel()
    return {
        "liked_fraction": float(((reward > 0) & (weight > 0)).sum()) / total,
        "disliked_fraction": float(((reward < 0) & (weight > 0)).sum()) / total,
    }


def check_marks_informative(reward: torch.Tensor, weight: torch.Tensor) -> None:
    """Refuse marks that carry no training signal once normalised over painted pixels."""
    painted = reward[weight > 0]
    if painted.numel() == 0:
        raise ValueError("nothing is painted; paint liked (green) and disliked (red) regions")
    if float(painted.max() - painted.min()) < 1e-3:
        kind = "liked" if float(painted.mean()) > 0 else "disliked"
        raise ValueError(
            f"only {kind} regions are painted; pxpo normalises rewards over the painted pixels, so marks of one "
            "kind carry no signal: also paint a region of the other kind"
        )


class HumanFeedbackReward:
    """The same person's marks for every sample (all samples share one prompt and seed).

    Returns a :class:`RewardOutput` with the reward and weight maps repeated over the batch.
    :meth:`set_marks` swaps in new marks between rounds of the feedback app (which creates
    the reward before the person has painted anything).
    """

    def __init__(self, reward: torch.Tensor | None = None, weight: torch.Tensor | None = None, name: str = "human"):
        self.name = name
        self.reward = self.weight = None
        if reward is not None or weight is not None:
            self.set_marks(reward, weight)

    def set_marks(self, reward: torch.Tensor, weight: torch.Tensor) -> None:
        if reward is None or weight is None or reward.dim() != 2 or reward.shape != weight.shape:
            raise ValueError(
                f"reward function {self.name!r}: reward {_shape(reward)} and weight {_shape(weight)} "
                "maps must both be (H, W)"
            )
        check_marks_informative(reward, weight)
        self.reward, self.weight = reward.float().cpu(), weight.float().cpu()

    def __call__(self, images, prompts=None, metadata=None) -> RewardOutput:
        check_images(images, self.name)
        if self.reward is None:
            raise RewardError(f"reward function {self.name!r} has no marks yet; call set_marks(reward, weight) first")
        batch, _, height, width = images.shape
        if (height, width) != tuple(self.reward.shape):
            raise RewardError(
                f"reward function {self.name!r}: the marks are {self.reward.shape[0]}x{self.reward.shape[1]} but the "
                f"images are {height}x{width}; paint on an image of the size the model generates"
            )
        return RewardOutput(
            reward=self.reward.expand(batch, height, width).clone(),
            weight=self.weight.expand(batch, height, width).clone(),
            info=describe_marks(self.reward, self.weight),
        )


def _shape(t) -> tuple | None:
    return tuple(t.shape) if t is not None else None


def feedback_from_masks(like_mask=None, dislike_mask=None, name: str = "human") -> HumanFeedbackReward:
    """The non-interactive route: marks from PNG files (or bytes); see the module docstring."""
    liked = mask_from_png(like_mask, f"like mask {like_mask}") if like_mask is not None else None
    disliked = mask_from_png(dislike_mask, f"dislike mask {dislike_mask}") if dislike_mask is not None else None
    reward, weight = marks_to_maps(liked, disliked)
    return HumanFeedbackReward(reward, weight, name=name)


@register_reward("human")
def human_from_masks(like_mask: str | Path | None = None, dislike_mask: str | Path | None = None) -> HumanFeedbackReward:
    """``--reward human --reward_kwargs '{"like_mask": "a.png", "dislike_mask": "b.png"}'``."""
    if like_mask is None and dislike_mask is None:
        raise ValueError("reward 'human' needs like_mask= and/or dislike_mask= (PNG files painted where you (dis)like)")
    return feedback_from_masks(like_mask, dislike_mask)
