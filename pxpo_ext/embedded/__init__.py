"""The embedded default model: a tiny text-to-image latent diffusion pipeline shipped with pxpo.

It is a standard diffusers ``StableDiffusionPipeline`` folder (``tiny-shapes/``) trained by
``python/pretrain_tiny.py`` on :mod:`pxpo_ext.scenes`, so pxpo does real work on a machine
with no network and no GPU. See ``docs/embedded_model.md`` for its architecture and quality.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from ..scenes import prompts as scene_prompts

PIPELINE_NAME = "tiny-shapes"
IMAGE_SIZE = 64
VAE_FACTOR = 4
LATENT_SIZE = IMAGE_SIZE // VAE_FACTOR  # 16x16 latent grid
LATENT_CHANNELS = 4
TEXT_LENGTH = 20  # tokens, including start and end; the longest scene caption takes 15
GUIDANCE_SCALE = 5.0
NUM_INFERENCE_STEPS = 20
DEFAULT_PROMPTS: tuple[str, ...] = tuple(scene_prompts(16, seed=1234))

_FILES = ("model_index.json", "unet", "vae", "text_encoder", "tokenizer", "scheduler")


def pipeline_path() -> Path:
    """The shipped pipeline folder (it may be missing in a source checkout that was never trained)."""
    return Path(__file__).resolve().parent / PIPELINE_NAME


def load_pipeline(device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, path: str | os.PathLike | None = None):
    """Load the embedded ``StableDiffusionPipeline`` offline, on ``device`` in ``dtype``."""
    from diffusers import StableDiffusionPipeline

    folder = Path(path) if path is not None else pipeline_path()
    missing = [name for name in _FILES if not (folder / name).exists()]
    if missing:
        raise FileNotFoundError(
            f"the embedded pipeline at {folder} lacks {', '.join(missing)}; "
            "train it with `python python/pretrain_tiny.py --device cuda --max-minutes 3` (the command in "
            "docs/embedded_model.md; on a CPU, `--threads 2`) "
            "or reinstall pxpo with its package data"
        )
    pipe = StableDiffusionPipeline.from_pretrained(
        folder, dtype=dtype, local_files_only=True, safety_checker=None, requires_safety_checker=False
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)
