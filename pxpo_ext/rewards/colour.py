"""Colour rewards: per-pixel feedback computed from the decoded RGB values (SPEC §7.1).

Two modes:

- ``"reduce"`` (the default, the paper's "less blue" experiment): ``R = -c`` for the chosen
  channel ``c`` in ``[0, 1]``, so ``R`` lies in ``[-1, 0]``. With ``relative=True`` the
  reward is ``R = -(c - mean(other two channels))`` in ``[-1, 1]``: a grey pixel scores 0,
  so white is not punished for being bright.
- ``"target"``: ``R = -d(pixel, target) / d_max`` (``direction="toward"``, in ``[-1, 0]``)
  or ``+d / d_max`` (``"away"``, in ``[0, 1]``), with ``d`` the Euclidean distance in
  sRGB (``d_max = sqrt(3)``) or CIELAB (ΔE*76, ``d_max = 100``; distances beyond it are
  not cut off, so Lab rewards can pass ±1 slightly).

Every mode multiplies by ``scale``.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .base import RewardError, check_images, register_reward

CHANNELS = {"red": 0, "green": 1, "blue": 2, "r": 0, "g": 1, "b": 2}
_NAMED_COLOURS = {
    "red": (1.0, 0.0, 0.0), "green": (0.0, 1.0, 0.0), "blue": (0.0, 0.0, 1.0),
    "white": (1.0, 1.0, 1.0), "black": (0.0, 0.0, 0.0), "yellow": (1.0, 1.0, 0.0),
    "cyan": (0.0, 1.0, 1.0), "magenta": (1.0, 0.0, 1.0), "grey": (0.5, 0.5, 0.5), "gray": (0.5, 0.5, 0.5),
}
_LAB_MAX_DISTANCE = 100.0
# sRGB (D65) -> XYZ, and the D65 white point, as in IEC 61966-2-1 / CIE 15.
_RGB_TO_XYZ = torch.tensor([[0.4124564, 0.3575761, 0.1804375],
                            [0.2126729, 0.7151522, 0.0721750],
                            [0.0193339, 0.1191920, 0.9503041]])
_D65_WHITE = torch.tensor([0.95047, 1.0, 1.08883])


def srgb_to_lab(images: torch.Tensor) -> torch.Tensor:
    """CIELAB (D65) of sRGB images ``(B, 3, H, W)`` in ``[0, 1]``; L in ``[0, 100]``."""
    x = images.float()
    linear = torch.where(x <= 0.04045, x / 12.92, ((x + 0.055) / 1.055) ** 2.4)
    xyz = torch.einsum("ij,bjhw->bihw", _RGB_TO_XYZ.to(x.device), linear)
    xyz = xyz / _D65_WHITE.to(x.device).view(1, 3, 1, 1)
    delta = 6.0 / 29.0
    f = torch.where(xyz > delta**3, xyz.clamp_min(1e-12) ** (1.0 / 3.0), xyz / (3 * delta**2) + 4.0 / 29.0)
    lightness = 116.0 * f[:, 1] - 16.0
    a = 500.0 * (f[:, 0] - f[:, 1])
    b = 200.0 * (f[:, 1] - f[:, 2])
    return torch.stack([lightness, a, b], dim=1)


def _parse_target(target, name: str) -> tuple[float, float, float]:
    if isinstance(target, str):
        text = target.strip().lower()
        if text in _NAMED_COLOURS:
            return _NAMED_COLOURS[text]
        if text.startswith("#") and len(text) == 7:
            try:
                return tuple(int(text[i:i + 2], 16) / 255.0 for i in (1, 3, 5))
            except ValueError:
                pass
        raise RewardError(
            f"reward function {name!r}: target colour {target!r} is not a colour name "
            f"({', '.join(sorted(_NAMED_COLOURS))}), a '#rrggbb' string or three numbers in [0, 1]"
        )
    if isinstance(target, Sequence) and len(target) == 3:
        values = tuple(float(v) for v in target)
        if all(math.isfinite(v) and 0.0 <= v <= 1.0 for v in values):
            return values
    raise RewardError(
        f"reward function {name!r}: target colour {target!r} must be three RGB numbers in [0, 1], "
        "a '#rrggbb' string or a colour name"
    )


class ColourReward:
    """Per-pixel colour reward ``(B, 3, H, W)`` in ``[0, 1]`` -> ``(B, H, W)`` float32 (see the module docstring)."""

    def __init__(self, mode: str = "reduce", channel: str = "blue", relative: bool = False,
                 target=None, space: str = "rgb", direction: str = "toward", scale: float = 1.0,
                 name: str = "colour"):
        self.name = name
        if mode not in ("reduce", "target"):
            raise ValueError(f"reward function {name!r}: mode must be 'reduce' or 'target', got {mode!r}")
        if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
            raise ValueError(f"reward function {name!r}: scale must be a positive finite number, got {scale!r}")
        self.mode, self.scale = mode, float(scale)
        if mode == "reduce":
            if str(channel).lower() not in CHANNELS:
                raise ValueError(f"reward function {name!r}: channel must be red, green or blue, got {channel!r}")
            if target is not None:
                raise ValueError(f"reward function {name!r}: a target colour needs mode='target'")
            self.channel = CHANNELS[str(channel).lower()]
            self.relative = bool(relative)
        else:
            if target is None:
                raise ValueError(f"reward function {name!r}: mode='target' needs target=(r, g, b), '#rrggbb' or a name")
            if space not in ("rgb", "lab"):
                raise ValueError(f"reward function {name!r}: space must be 'rgb' or 'lab', got {space!r}")
            if direction not in ("toward", "away"):
                raise ValueError(f"reward function {name!r}: direction must be 'toward' or 'away', got {direction!r}")
            self.target = _parse_target(target, name)
            self.space, self.direction = space, direction

    def __repr__(self) -> str:
        if self.mode == "reduce":
            detail = f"channel={'rgb'[self.channel]}, relative={self.relative}"
        else:
            detail = f"target={self.target}, space={self.space}, direction={self.direction}"
        return f"ColourReward({self.mode}, {detail}, scale={self.scale})"

    def __call__(self, images, prompts=None, metadata=None) -> torch.Tensor:
        x = check_images(images, self.name).float()
        if self.mode == "reduce":
            value = x[:, self.channel]
            if self.relative:
                others = [c for c in range(3) if c != self.channel]
                value = value - x[:, others].mean(dim=1)
            return -self.scale * value
        target = torch.tensor(self.target, device=x.device).view(1, 3, 1, 1)
        if self.space == "rgb":
            distance = (x - target).norm(dim=1) / math.sqrt(3.0)
        else:
            distance = (srgb_to_lab(x) - srgb_to_lab(target)).norm(dim=1) / _LAB_MAX_DISTANCE
        sign = -1.0 if self.direction == "toward" else 1.0
        return sign * self.scale * distance


@register_reward("colour")
def colour_reward(**options) -> ColourReward:
    """The default reward: ``-blue`` per pixel (``ColourReward`` options change it)."""
    return ColourReward(**options)
