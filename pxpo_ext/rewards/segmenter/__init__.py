"""The small segmentation network pxpo ships for its embedded model, and the ``remove_circles`` reward.

:class:`ShapeSegmenter` labels every pixel of a scene from :mod:`pxpo_ext.scenes` as
background or one of its shapes. ``python/train_segmenter.py`` trains it on the scene
generator's ground-truth masks and writes ``shape_segmenter.safetensors`` next to this file;
``remove_circles`` is the offline twin of the paper's "remove the hair" experiment.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..base import register_reward
from ..segmentation import SegmentationReward

WEIGHTS = Path(__file__).with_name("shape_segmenter.safetensors")
# Class order matches ``pxpo_ext.scenes.Scene.label_map``: 0 background, 1 + SHAPES.index(shape).
CLASSES = ("background", "circle", "square", "triangle", "star")
INPUT_SIZE = 64  # scenes' shapes are sized relative to the image; the network sees them at 64x64


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
    )


class ShapeSegmenter(nn.Module):
    """A small U-Net: ``(B, 3, H, W)`` in ``[0, 1]`` -> ``(B, len(CLASSES), H, W)`` logits.

    H and W must be multiples of 8. It works at half resolution (a 64x64 scene costs about
    20 M multiply-adds, so it trains on a shared 2-core CPU in minutes) and upsamples its
    logits; the coarsest level (1/8 scale) sees a whole shape, which is what tells a circle
    from a square, and the skips keep the edges in place.
    """

    def __init__(self, width: int = 16, num_classes: int = len(CLASSES)):
        super().__init__()
        self.width = width
        self.stem = nn.Sequential(
            nn.Conv2d(3, width // 2, 3, padding=1, bias=False), nn.BatchNorm2d(width // 2), nn.ReLU(inplace=True),
            nn.Conv2d(width // 2, width, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
        )
        self.enc1 = _block(width, width)
        self.enc2 = _block(width, 2 * width)
        self.bottom = _block(2 * width, 2 * width)
        self.dec2 = _block(4 * width, width)
        self.dec1 = _block(2 * width, width)
        self.head = nn.Conv2d(width, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] % 8 or x.shape[-2] % 8:
            raise ValueError(f"ShapeSegmenter needs a height and width that are multiples of 8, got {tuple(x.shape)}")
        e1 = self.enc1(self.stem(x * 2 - 1))
        e2 = self.enc2(F.max_pool2d(e1, 2))
        b = self.bottom(F.max_pool2d(e2, 2))
        d2 = self.dec2(torch.cat([F.interpolate(b, scale_factor=2.0), e2], 1))
        d1 = self.dec1(torch.cat([F.interpolate(d2, scale_factor=2.0), e1], 1))
        return F.interpolate(self.head(d1), scale_factor=2.0, mode="bilinear", align_corners=False)


def save_segmenter(model: ShapeSegmenter, path: Path = WEIGHTS, metrics: dict | None = None) -> None:
    """Write the weights and, as safetensors metadata, the width, classes and measured metrics."""
    from safetensors.torch import save_file

    metadata = {"width": str(model.width), "classes": json.dumps(CLASSES), "metrics": json.dumps(metrics or {})}
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path), metadata=metadata)


def load_segmenter(path: Path | str = WEIGHTS) -> ShapeSegmenter:
    """The shipped network in eval mode (CPU, float32)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"segmenter weights {path} are missing; run `python python/train_segmenter.py` to train them"
        )
    with safe_open(str(path), framework="pt") as f:
        width = int(f.metadata()["width"])
    model = ShapeSegmenter(width)
    model.load_state_dict(load_file(str(path)))
    return model.eval()


def segmenter_metrics(path: Path | str = WEIGHTS) -> dict:
    """The held-out metrics ``train_segmenter.py`` measured and stored with the weights."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return json.loads(f.metadata().get("metrics", "{}"))


@register_reward("remove_circles")
def remove_circles(classes=("circle",), weights=-1.0, weights_path: str | None = None) -> SegmentationReward:
    """``R = -p(circle)`` per pixel from the shipped segmenter, in ``[-1, 0]``; other shapes via ``classes``."""
    model = load_segmenter(weights_path or WEIGHTS)
    return SegmentationReward(model, classes, weights, class_names=CLASSES,
                              input_size=(INPUT_SIZE, INPUT_SIZE), name="remove_circles")
