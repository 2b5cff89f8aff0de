"""The reward-function contract and the registry of named reward functions.

A reward function is called as ``reward_fn(images, prompts, metadata)`` with ``images`` a
float tensor ``(B, 3, H, W)`` in ``[0, 1]``, ``prompts`` a list of ``B`` strings and
``metadata`` a list of ``B`` dicts. It returns one of:

- a tensor or array of per-image scalars ``(B,)`` (DDPO: a constant map) or maps ``(B, H, W)``
  / ``(B, 1, H, W)`` at image resolution;
- ``(rewards, info)`` as in TRL, where ``info`` is a dict that may hold ``"weight"``;
- a :class:`RewardOutput`.

A weight map in ``[0, 1]`` of the rewards' shape says where there is feedback (0: none).
:func:`normalize_output` checks all of this and names the reward function in every error.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from ..ops import check_reward_values
from ..user_code import FORMS, UserCodeError, accepts, import_object, is_import_path
from ..user_code import display_name as reward_name  # noqa: F401  (what reward code imports from here)


class RewardError(ValueError):
    """A reward function returned something pxpo cannot use; the message names the function."""


class UnknownRewardError(KeyError):
    """No reward is registered under the name, and the name is not an import path."""


@dataclass
class RewardOutput:
    reward: torch.Tensor  # (B,) or (B, H, W), float32
    weight: torch.Tensor | None = None  # (B, H, W) in [0, 1], or None for full weight
    info: dict = field(default_factory=dict)


def check_images(images, name: str) -> torch.Tensor:
    """Refuse anything but a finite float ``(B, 3, H, W)`` tensor in ``[0, 1]``; the error names ``name``."""
    if not isinstance(images, torch.Tensor):
        raise RewardError(f"reward function {name!r} needs images as a torch tensor, got {type(images).__name__}")
    if images.dim() != 4 or images.shape[1] != 3:
        raise RewardError(
            f"reward function {name!r} needs images of shape (B, 3, H, W), got {tuple(images.shape)}; "
            "pass RGB images channels-first"
        )
    if not images.dtype.is_floating_point:
        raise RewardError(
            f"reward function {name!r} needs float images in [0, 1], got dtype {images.dtype}; divide uint8 images by 255"
        )
    if images.numel() == 0:
        raise RewardError(f"reward function {name!r} got an empty batch of shape {tuple(images.shape)}")
    if not bool(torch.isfinite(images).all()):
        raise RewardError(f"reward function {name!r} got images with NaN or infinite values")
    low, high = images.min().item(), images.max().item()
    if low < 0.0 or high > 1.0:
        raise RewardError(
            f"reward function {name!r} needs images in [0, 1], got values in [{low:g}, {high:g}]; "
            "decode with (x / 2 + 0.5).clamp(0, 1)"
        )
    return images


def _tensor(value, name: str, what: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        t = value.detach()
    elif isinstance(value, (np.ndarray, list, tuple, float, int)):
        t = torch.as_tensor(np.asarray(value))
    else:
        raise RewardError(f"reward function {name!r} returned {what} of type {type(value).__name__}; return a tensor")
    if not (t.dtype.is_floating_point or t.dtype in (torch.bool, torch.uint8, torch.int32, torch.int64)):
        raise RewardError(f"reward function {name!r} returned {what} of dtype {t.dtype}; return floats")
    return t.to(torch.float32).cpu()


def normalize_output(out, name: str, batch: int, image_size: tuple[int, int]) -> RewardOutput:
    """Check and convert a reward function's return value (see the module docstring)."""
    info: dict = {}
    weight = None
    if isinstance(out, RewardOutput):
        reward, weight, info = out.reward, out.weight, dict(out.info)
    elif isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], dict):
        reward, info = out[0], dict(out[1])
        weight = info.pop("weight", None)
    else:
        reward = out
    reward = _tensor(reward, name, "rewards")
    if reward.dim() == 4 and reward.shape[1] == 1:
        reward = reward[:, 0]
    height, width = image_size
    if reward.dim() == 1:
        expected = (batch,)
    elif reward.dim() == 3:
        expected = (batch, height, width)
    else:
        expected = None
    if expected is None or tuple(reward.shape) != expected:
        raise RewardError(
            f"reward function {name!r} returned rewards of shape {tuple(reward.shape)}; expected ({batch},) "
            f"per-image scalars or ({batch}, {height}, {width}) maps for {batch} images of {height}x{width}"
        )
    if weight is not None:
        weight = _tensor(weight, name, "a weight map")
        if weight.dim() == 4 and weight.shape[1] == 1:
            weight = weight[:, 0]
        if tuple(weight.shape) != (batch, height, width):
            raise RewardError(
                f"reward function {name!r} returned a weight map of shape {tuple(weight.shape)}; "
                f"expected ({batch}, {height}, {width})"
            )
    check_reward_values(reward, weight, f"reward function {name!r}", RewardError)
    return RewardOutput(reward=reward, weight=weight, info=info)


_REGISTRY: dict[str, Callable[..., Callable]] = {}


def register_reward(name: str):
    """Register a factory ``factory(**options) -> reward_fn`` under ``name`` (used by ``--reward``)."""

    def decorate(factory):
        if name in _REGISTRY:
            raise ValueError(f"a reward named {name!r} is already registered")
        _REGISTRY[name] = factory
        return factory

    return decorate


def available_rewards() -> list[str]:
    return sorted(_REGISTRY)


def get_reward(name: str, **options) -> Callable:
    """Build the reward ``name`` with ``options``: a registered name, or an import path.

    An import path (``"package.module:name"`` or ``"path/to/file.py:name"``) names either a reward
    function, which takes ``(images, prompts, metadata)`` and no options, or a factory like the
    registered ones, which is called with ``options`` as keyword arguments and returns one.
    """
    if name in _REGISTRY:
        fn = _REGISTRY[name](**options)
    elif is_import_path(name):
        fn = _imported_reward(name, options)
    else:
        raise UnknownRewardError(f"unknown reward {name!r}; available: {', '.join(available_rewards()) or 'none'}, "
                                 f"or your own as {FORMS}")
    if getattr(fn, "name", None) is None:
        try:
            fn.name = name
        except AttributeError:
            pass
    return fn


def _imported_reward(name: str, options: dict) -> Callable:
    what = f"reward {name!r}"
    target = import_object(name, what)
    if not callable(target):
        raise UserCodeError(f"{what} is a {type(target).__name__}, not a reward function or a factory of one")
    if accepts(target, **options):  # a factory (or a class) taking the options
        fn = target(**options)
        if not callable(fn):
            raise UserCodeError(f"{what} returned a {type(fn).__name__} when called with {options or 'no options'}; "
                                "a factory must return a reward function reward_fn(images, prompts, metadata)")
        return fn
    if accepts(target, None, None, None):  # the reward function itself
        if options:
            raise UserCodeError(f"{what} is a reward function and takes no options, got {sorted(options)}; "
                                "to take options, name a factory that is called with them and returns the function")
        return target
    raise UserCodeError(f"{what} takes neither (images, prompts, metadata) nor the options {sorted(options)}: "
                        "name a reward function, or a factory called with --reward-kwargs as keyword arguments")
