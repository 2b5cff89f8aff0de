"""Scalar rewards, DDPO's baselines: one value per image, which pxpo treats as a constant map.

- ``jpeg_compressibility``: ``-size`` of the image saved as JPEG at quality 95, in kB
  (1 kB = 1000 bytes), as in DDPO (Black et al. 2023); ``jpeg_incompressibility``: ``+size``.
- :func:`scalar_reward` wraps any user function ``fn(images, prompts, metadata)`` that
  returns one number per image; the registered ``"scalar"`` reward imports such a function
  from ``"package.module:function"`` or ``"path/to/file.py:function"`` so that
  ``python/train.py --reward scalar`` can use it.
"""
from __future__ import annotations

import io
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image

from ..user_code import import_object
from .base import RewardError, check_images, register_reward, reward_name

JPEG_QUALITY = 95


def jpeg_size_kb(images: torch.Tensor, quality: int = JPEG_QUALITY) -> torch.Tensor:
    """Size in kB of each image ``(B, 3, H, W)`` in ``[0, 1]`` saved as an 8-bit JPEG at ``quality``."""
    pixels = (images.detach().float() * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    sizes = []
    for array in pixels:
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="JPEG", quality=quality)
        sizes.append(buffer.tell() / 1000.0)
    return torch.tensor(sizes, dtype=torch.float32)


class JpegReward:
    """``sign * JPEG size in kB`` per image: ``sign=-1`` rewards compressible images, ``+1`` incompressible ones."""

    def __init__(self, sign: float, quality: int = JPEG_QUALITY, name: str = "jpeg_compressibility"):
        if sign not in (-1, 1, -1.0, 1.0):
            raise ValueError(f"reward function {name!r}: sign must be -1 or +1, got {sign!r}")
        if not (isinstance(quality, int) and 1 <= quality <= 100):
            raise ValueError(f"reward function {name!r}: JPEG quality must be an integer in [1, 100], got {quality!r}")
        self.sign, self.quality, self.name = float(sign), quality, name

    def __call__(self, images, prompts=None, metadata=None) -> torch.Tensor:
        check_images(images, self.name)
        return self.sign * jpeg_size_kb(images, self.quality)


@register_reward("jpeg_compressibility")
def jpeg_compressibility(quality: int = JPEG_QUALITY) -> JpegReward:
    return JpegReward(-1.0, quality, name="jpeg_compressibility")


@register_reward("jpeg_incompressibility")
def jpeg_incompressibility(quality: int = JPEG_QUALITY) -> JpegReward:
    return JpegReward(1.0, quality, name="jpeg_incompressibility")


class ScalarReward:
    """A user function returning one value per image, checked: ``B`` finite numbers, else a :class:`RewardError`."""

    def __init__(self, fn: Callable, name: str | None = None):
        if not callable(fn):
            raise TypeError(f"scalar_reward needs a callable fn(images, prompts, metadata), got {type(fn).__name__}")
        self.fn = fn
        self.name = name or reward_name(fn)

    def __call__(self, images, prompts=None, metadata=None) -> torch.Tensor:
        check_images(images, self.name)
        batch = images.shape[0]
        prompts = list(prompts) if prompts is not None else [""] * batch
        metadata = list(metadata) if metadata is not None else [{} for _ in range(batch)]
        values = self.fn(images, prompts, metadata)
        if values is None:
            raise RewardError(f"reward function {self.name!r} returned None; return {batch} numbers, one per image")
        if isinstance(values, torch.Tensor):
            values = values.detach().float().cpu()
        else:
            try:
                values = torch.as_tensor(np.asarray(values, dtype=np.float64), dtype=torch.float32)
            except (TypeError, ValueError) as error:
                raise RewardError(
                    f"reward function {self.name!r} returned {type(values).__name__}, not numbers ({error}); "
                    f"return {batch} numbers, one per image"
                ) from None
        if values.dim() == 2 and values.shape[1] == 1:
            values = values[:, 0]
        if tuple(values.shape) != (batch,):
            raise RewardError(
                f"reward function {self.name!r} returned values of shape {tuple(values.shape)}; "
                f"expected ({batch},): one number per image"
            )
        if not bool(torch.isfinite(values).all()):
            raise RewardError(f"reward function {self.name!r} returned NaN or infinite values: {values.tolist()}")
        return values


def scalar_reward(fn: Callable, name: str | None = None) -> ScalarReward:
    """Turn ``fn(images, prompts, metadata) -> B numbers`` into a checked pxpo reward function."""
    return ScalarReward(fn, name)


@register_reward("scalar")
def scalar_from_path(function: str | None = None) -> ScalarReward:
    """``--reward scalar --reward_kwargs '{"function": "mypkg.rewards:aesthetic"}'``."""
    if function is None:
        raise ValueError("reward 'scalar' needs function='package.module:function' or 'path/to/file.py:function' "
                         "(one number per image)")
    return ScalarReward(import_object(function, "reward 'scalar'"), name=str(function))
