"""Segmentation rewards: any model that maps images to per-pixel class scores (SPEC §7.2).

The model's scores ``(B, K, h, w)`` (a tensor, an output with ``.logits`` as transformers'
semantic-segmentation models return, or a dict with ``"logits"`` or torchvision's
``"out"``) are upsampled bilinearly to the image size, turned into probabilities ``p``
(softmax over classes, or a sigmoid per class for multi-label models), and

    R[b, y, x] = sum over chosen classes k of weight_k * p[b, k, y, x]

so ``weight = -1`` on one class ("remove the hair", "remove the circles") gives rewards in
``[-1, 0]``, and a positive weight asks for more of a class.
"""
from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F

from .base import RewardError, register_reward
from .base import check_images


def _model_labels(model) -> dict[str, int]:
    config = getattr(model, "config", None)
    id2label = getattr(config, "id2label", None) or {}
    return {str(label): int(index) for index, label in id2label.items()}


def _scores(output, name: str) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping):
        for key in ("logits", "out"):
            if key in output:
                return output[key]
    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    raise RewardError(
        f"reward function {name!r}: the segmentation model returned {type(output).__name__}; it must return "
        "(B, K, h, w) class scores, an object with .logits, or a dict with 'logits' or 'out'"
    )


class SegmentationReward:
    """Per-pixel reward ``sum_k weight_k * p_k`` from a segmentation model (see the module docstring).

    Args:
        model: a ``torch.nn.Module`` mapping ``(B, 3, H', W')`` to class scores.
        classes: class indices, or label names looked up in ``class_names`` or the model's
            ``config.id2label``.
        weights: one number for every class, or one per class; negative removes, positive adds.
        activation: ``"softmax"`` (one class per pixel) or ``"sigmoid"`` (independent classes).
        image_mean, image_std: per-channel normalisation the model expects (None: pixels in ``[0, 1]``).
        input_size: ``(height, width)`` to resize images to before the model (None: as they are).
        class_names: label names in class order, for models without ``config.id2label``.
        batch_size: images per forward pass, to bound memory.
    """

    def __init__(self, model: torch.nn.Module, classes, weights=-1.0, activation: str = "softmax",
                 image_mean=None, image_std=None, input_size=None, class_names=None, batch_size: int = 16,
                 name: str = "segmentation"):
        self.name = name
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"reward function {name!r}: model must be a torch.nn.Module, got {type(model).__name__}")
        if activation not in ("softmax", "sigmoid"):
            raise ValueError(f"reward function {name!r}: activation must be 'softmax' or 'sigmoid', got {activation!r}")
        if isinstance(classes, (str, int)):
            classes = [classes]
        if not classes:
            raise ValueError(f"reward function {name!r}: choose at least one class")
        labels = {str(n): i for i, n in enumerate(class_names)} if class_names else _model_labels(model)
        self.classes = [self._class_index(c, labels) for c in classes]
        if isinstance(weights, (int, float)):
            weights = [float(weights)] * len(self.classes)
        weights = [float(w) for w in weights]
        if len(weights) != len(self.classes) or not all(math.isfinite(w) for w in weights):
            raise ValueError(
                f"reward function {name!r}: weights must be one finite number or one per class "
                f"({len(self.classes)} classes), got {weights}"
            )
        self.weights = weights
        self.model = model.eval()
        self.activation = activation
        self.mean = self._channel_stats(image_mean, "image_mean")
        self.std = self._channel_stats(image_std, "image_std")
        if self.std is not None and bool((self.std <= 0).any()):
            raise ValueError(f"reward function {name!r}: image_std must be positive, got {image_std}")
        self.input_size = tuple(int(s) for s in input_size) if input_size is not None else None
        self.batch_size = int(batch_size)

    def _class_index(self, cls, labels: dict[str, int]) -> int:
        if isinstance(cls, bool) or not isinstance(cls, (int, str)):
            raise TypeError(f"reward function {self.name!r}: a class is an index or a label name, got {cls!r}")
        if isinstance(cls, int):
            if cls < 0:
                raise ValueError(f"reward function {self.name!r}: class index {cls} is negative")
            return cls
        if cls not in labels:
            known = ", ".join(sorted(labels)) or "none (pass class_names or indices)"
            raise ValueError(f"reward function {self.name!r}: unknown class {cls!r}; known labels: {known}")
        return labels[cls]

    def _channel_stats(self, values, what: str) -> torch.Tensor | None:
        if values is None:
            return None
        t = torch.as_tensor(values, dtype=torch.float32).flatten()
        if t.numel() == 1:
            t = t.repeat(3)
        if t.numel() != 3:
            raise ValueError(f"reward function {self.name!r}: {what} needs 1 or 3 values, got {list(values)}")
        return t.view(1, 3, 1, 1)

    def probabilities(self, images: torch.Tensor) -> torch.Tensor:
        """Class probabilities ``(B, K, H, W)`` at the images' resolution (float32)."""
        check_images(images, self.name)
        parameter = next(self.model.parameters(), None)
        device = parameter.device if parameter is not None else images.device
        dtype = parameter.dtype if parameter is not None and parameter.dtype.is_floating_point else torch.float32
        height, width = images.shape[-2:]
        chunks = []
        with torch.no_grad():
            for batch in images.split(self.batch_size):
                x = batch.to(device=device, dtype=torch.float32)
                if self.input_size is not None and tuple(x.shape[-2:]) != self.input_size:
                    x = F.interpolate(x, size=self.input_size, mode="bilinear", align_corners=False, antialias=True)
                if self.mean is not None:
                    x = x - self.mean.to(device)
                if self.std is not None:
                    x = x / self.std.to(device)
                scores = _scores(self.model(x.to(dtype)), self.name)
                chunks.append(self._check_scores(scores, len(batch)).float())
        scores = torch.cat(chunks)
        if tuple(scores.shape[-2:]) != (height, width):
            scores = F.interpolate(scores, size=(height, width), mode="bilinear", align_corners=False)
        probs = scores.softmax(dim=1) if self.activation == "softmax" else scores.sigmoid()
        return probs.to(images.device)

    def _check_scores(self, scores: torch.Tensor, batch: int) -> torch.Tensor:
        if not isinstance(scores, torch.Tensor) or scores.dim() != 4 or scores.shape[0] != batch:
            shape = tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__
            raise RewardError(
                f"reward function {self.name!r}: the segmentation model returned scores of shape {shape}; "
                f"expected ({batch}, K, h, w) per-pixel class scores"
            )
        if max(self.classes) >= scores.shape[1]:
            raise RewardError(
                f"reward function {self.name!r}: class {max(self.classes)} chosen but the model scores "
                f"{scores.shape[1]} classes (shape {tuple(scores.shape)})"
            )
        if not bool(torch.isfinite(scores).all()):
            raise RewardError(f"reward function {self.name!r}: the segmentation model returned NaN or infinite scores")
        return scores

    def __call__(self, images, prompts=None, metadata=None) -> torch.Tensor:
        probs = self.probabilities(images)
        weights = torch.tensor(self.weights, device=probs.device).view(1, -1, 1, 1)
        return (probs[:, self.classes] * weights).sum(dim=1)


def from_transformers(model, classes, weights=-1.0, name: str = "segmentation", local_files_only: bool = True,
                      **options) -> SegmentationReward:
    """A :class:`SegmentationReward` for a transformers semantic-segmentation model (or its folder).

    A folder or hub id is loaded with ``AutoModelForSemanticSegmentation``; its image
    processor's ``image_mean``/``image_std`` (and ``size``) become the normalisation, unless
    ``options`` set them. ``local_files_only=True`` keeps training runs from downloading.
    """
    if isinstance(model, (str, bytes)) or hasattr(model, "__fspath__"):
        from transformers import AutoImageProcessor, AutoModelForSemanticSegmentation

        path = str(model)
        try:
            model = AutoModelForSemanticSegmentation.from_pretrained(path, local_files_only=local_files_only)
        except OSError as error:
            raise ValueError(
                f"reward function {name!r}: cannot load a semantic-segmentation model from {path!r} ({error}); "
                "pass a local folder with config.json and weights"
            ) from None
        try:
            processor = AutoImageProcessor.from_pretrained(path, local_files_only=local_files_only)
        except OSError:
            processor = None
        if processor is not None:
            options.setdefault("image_mean", getattr(processor, "image_mean", None))
            options.setdefault("image_std", getattr(processor, "image_std", None))
            size = getattr(processor, "size", None)  # a dict, or transformers 5's SizeDict
            read = (lambda key: size.get(key)) if isinstance(size, Mapping) else (lambda key: getattr(size, key, None))
            if read("height") and read("width"):
                options.setdefault("input_size", (read("height"), read("width")))
    return SegmentationReward(model, classes, weights, name=name, **options)


@register_reward("segmentation")
def segmentation_from_folder(model: str | None = None, classes=None, weights=-1.0, **options) -> SegmentationReward:
    """``--reward segmentation --reward_kwargs '{"model": "path/to/segformer", "classes": ["hair"]}'``."""
    if model is None or classes is None:
        raise ValueError(
            "reward 'segmentation' needs model= (a local transformers semantic-segmentation folder) and "
            "classes= (label names or indices); weights=-1 removes them"
        )
    return from_transformers(model, classes, weights, **options)
