"""The PXPO/DDPO trainer over diffusers: ``PXPOConfig``, ``PXPOTrainer`` and ``load_pipeline``.

See docs/training.md for the loop, the settings and how checkpoints and resume work.
"""
from .config import PXPOConfig
from .trainer import PXPOTrainer, load_pipeline

__all__ = ["PXPOConfig", "PXPOTrainer", "load_pipeline"]
