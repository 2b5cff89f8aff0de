"""One person's feedback session: an image for a prompt and seed, rounds of marks, training in the background.

A round: the person's marks become the :class:`~pxpo_ext.rewards.human.HumanFeedbackReward`
maps, the trainer runs ``epochs_per_round`` PXPO epochs on the prompt with metadata
``{"seed": seed, "same_trajectory": True}`` (every sample is the shown image's own trajectory, so the marks
score the actions they were given for), then renders the image again.
The web server (:mod:`pxpo_ext.feedback.server`) and the PNG-mask route of
``python/feedback.py`` both drive this class.

The trainer is anything with ``step(epoch) -> dict``, ``generate(prompts, seeds) -> images``
and ``save_pretrained(folder)`` (:class:`pxpo_ext.trainer.PXPOTrainer`).
"""
from __future__ import annotations

import io
import logging
import math
import threading
import time
import traceback
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..rewards.human import (
    HumanFeedbackReward,
    check_marks_informative,
    describe_marks,
    marks_to_maps,
)

logger = logging.getLogger(__name__)


class SessionBusy(RuntimeError):
    """A round is training; the request must wait for it."""


def image_to_png(image: torch.Tensor) -> bytes:
    """PNG bytes of one image ``(3, H, W)`` in ``[0, 1]``."""
    array = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array)).save(buffer, format="PNG")
    return buffer.getvalue()


class FeedbackSession:
    """Holds the current image, the round counter and the training thread (thread-safe)."""

    def __init__(self, trainer, reward_fn: HumanFeedbackReward, prompt: str, seed: int, output_dir,
                 epochs_per_round: int = 2):
        if epochs_per_round < 1:
            raise ValueError(f"epochs_per_round must be at least 1, got {epochs_per_round}")
        self.trainer, self.reward_fn = trainer, reward_fn
        self.prompt, self.seed = prompt, int(seed)
        self.output_dir = Path(output_dir)
        self.epochs_per_round = epochs_per_round
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.round = 0
        self.epochs_done = 0
        self.status = "idle"  # idle | training | error
        self.message = "paint liked (green) and disliked (red) regions, then submit"
        self.progress = {"epoch": 0, "epochs": 0, "started": None}
        self.history: list[dict] = []
        self.image = self._render()
        self.image_version = 0
        self.png = image_to_png(self.image)

    @property
    def image_size(self) -> tuple[int, int]:
        return tuple(self.image.shape[-2:])

    def _render(self) -> torch.Tensor:
        return self.trainer.generate([self.prompt], [self.seed])[0].detach().cpu()

    def state(self) -> dict:
        with self._lock:
            started = self.progress["started"]
            return {
                "prompt": self.prompt,
                "seed": self.seed,
                "status": self.status,
                "message": self.message,
                "round": self.round,
                "image_version": self.image_version,
                "image_size": list(self.image_size),
                "progress": {"epoch": self.progress["epoch"], "epochs": self.progress["epochs"],
                             "elapsed": round(time.time() - started, 1) if started else 0.0},
                "last_metrics": self.history[-1] if self.history else None,
            }

    def check_marks(self, liked: torch.Tensor | None, disliked: torch.Tensor | None):
        """Check marks against the image and turn them into ``(reward, weight)`` maps (ValueError if unusable)."""
        for name, mask in (("liked", liked), ("disliked", disliked)):
            if mask is not None and tuple(mask.shape) != self.image_size:
                height, width = self.image_size
                raise ValueError(f"the {name} marks are {mask.shape[0]}x{mask.shape[1]} pixels but the image is "
                                 f"{height}x{width}; paint on the image itself")
        reward, weight = marks_to_maps(liked, disliked)
        check_marks_informative(reward, weight)
        return reward, weight

    def submit(self, liked: torch.Tensor | None, disliked: torch.Tensor | None, wait: bool = False) -> dict:
        """Start a round on these marks; ``wait=True`` blocks until it ends (the PNG-mask route)."""
        reward, weight = self.check_marks(liked, disliked)
        with self._lock:
            if self.status == "training":
                raise SessionBusy("a round is still training; wait for the new image")
            self.reward_fn.set_marks(reward, weight)
            self.round += 1
            self.status = "training"
            self.message = f"round {self.round}: training {self.epochs_per_round} epoch(s)"
            self.progress = {"epoch": 0, "epochs": self.epochs_per_round, "started": time.time()}
            self._thread = threading.Thread(target=self._train_round, args=(describe_marks(reward, weight),),
                                            name="pxpo-feedback-round", daemon=True)
            self._thread.start()
        if wait:
            self._thread.join()
        return self.state()

    def _train_round(self, marks: dict) -> None:
        try:
            for _ in range(self.epochs_per_round):
                metrics = self.trainer.step(self.epochs_done)
                with self._lock:
                    self.epochs_done += 1
                    self.progress["epoch"] += 1
                    self.history.append({"round": self.round, **marks, **_plain(metrics)})
            image = self._render()
            png = image_to_png(image)
            with self._lock:
                self.image, self.png = image, png
                self.image_version += 1
                self.status = "idle"
                self.message = f"round {self.round} done: paint again, or save the LoRA"
        except Exception as error:  # noqa: BLE001 - reported to the page, which can retry
            logger.error("feedback round %d failed:\n%s", self.round, traceback.format_exc())
            with self._lock:
                self.status = "error"
                self.message = f"round {self.round} failed: {type(error).__name__}: {error}"

    def wait(self, timeout: float | None = None) -> None:
        thread = self._thread
        if thread is not None:
            thread.join(timeout)

    def save(self, folder=None) -> Path:
        """Save the LoRA (``pipe.load_lora_weights(folder)`` loads it); refused while a round trains."""
        folder = Path(folder) if folder is not None else self.output_dir / "lora"
        with self._lock:
            if self.status == "training":
                raise SessionBusy("a round is still training; save when the new image is shown")
            self.trainer.save_pretrained(folder)
            self.message = f"saved the LoRA to {folder}"
        return folder


def _plain(metrics: dict) -> dict:
    """JSON-friendly copy of a metrics dict (numbers, strings, None)."""
    out = {}
    for key, value in (metrics or {}).items():
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        if isinstance(value, float) and not math.isfinite(value):
            value = None  # JSON has no NaN; the page would fail to parse it
        if isinstance(value, (int, float, str, bool)) or value is None:
            out[key] = value
    return out


# Feedback rounds are short and all samples share one prompt and seed: normalise over the
# batch (earlier rounds' marks in a per-prompt buffer would mix old wishes into new ones),
# and skip the trainer's periodic checkpoints and image grids.
FEEDBACK_DEFAULTS = {"per_prompt_stat_tracking": False, "num_eval_images": 0, "log_images_every": 0, "save_freq": 0,
                     "sample_num_batches_per_epoch": 1}


def create_session(prompt: str, seed: int, model: str | None = None, pipeline=None,
                   output_dir="runs/feedback", epochs_per_round: int = 2, **config_fields) -> FeedbackSession:
    """A session over a new :class:`~pxpo_ext.trainer.PXPOTrainer` with the human reward.

    ``config_fields`` are :class:`~pxpo_ext.trainer.PXPOConfig` fields (e.g. ``sample_batch_size``,
    ``train_learning_rate``); ``pipeline`` (else ``model``, else the embedded model) is fine-tuned.
    """
    from ..trainer import PXPOConfig, PXPOTrainer, load_pipeline

    fields = {**FEEDBACK_DEFAULTS, **config_fields}
    fields.setdefault("train_batch_size", fields.get("sample_batch_size", PXPOConfig.sample_batch_size))
    config = PXPOConfig(model=model, reward="human", prompts=f"text:{prompt}", output_dir=str(output_dir),
                        seed=int(seed), **fields)
    reward_fn = HumanFeedbackReward()
    metadata = {"seed": int(seed), "same_trajectory": True}  # train on the trajectory of the marked image
    trainer = PXPOTrainer(config, reward_fn, lambda: (prompt, dict(metadata)),
                          pipeline if pipeline is not None else load_pipeline(model))
    return FeedbackSession(trainer, reward_fn, prompt, seed, output_dir, epochs_per_round)
