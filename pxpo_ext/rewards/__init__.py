"""Reward functions: per-pixel feedback sources (colour, segmentation, a person) and DDPO's scalars.

Importing this package registers every built-in reward by name (``get_reward(name, **options)``):
``colour`` (the default: less blue), ``segmentation``, ``remove_circles``, ``scene_alignment``, ``human``,
``jpeg_compressibility``, ``jpeg_incompressibility`` and ``scalar``. See docs/rewards.md.
"""
from .base import (
    RewardError,
    RewardOutput,
    UnknownRewardError,
    available_rewards,
    check_images,
    get_reward,
    normalize_output,
    register_reward,
)
from .colour import ColourReward
from .human import HumanFeedbackReward, feedback_from_masks, marks_to_maps
from .scalar import JpegReward, scalar_reward
from .scene import SceneAlignmentReward
from .segmentation import SegmentationReward, from_transformers
from .segmenter import load_segmenter

__all__ = [
    "ColourReward",
    "HumanFeedbackReward",
    "JpegReward",
    "RewardError",
    "RewardOutput",
    "SceneAlignmentReward",
    "SegmentationReward",
    "UnknownRewardError",
    "available_rewards",
    "check_images",
    "feedback_from_masks",
    "from_transformers",
    "get_reward",
    "load_segmenter",
    "marks_to_maps",
    "normalize_output",
    "register_reward",
    "scalar_reward",
]
