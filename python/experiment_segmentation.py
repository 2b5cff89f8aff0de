"""Experiment 2 (segmentation): "remove the circles" with the shipped shape segmenter.

Usage (after ``pip install -e .`` in the repository root)::

    python python/experiment_segmentation.py            # about 4 min on a 2-core CPU
    python python/experiment_segmentation.py --quick    # seconds, tiny settings (smoke test)
    python python/experiment_segmentation.py --help

What it measures and how: :mod:`pxpo_ext.experiments.programs.segmentation` and docs/experiments.md.
"""
from pxpo_ext.cli import quiet_torchvision_fallback

quiet_torchvision_fallback()  # first: transformers warns while diffusers is imported

from pxpo_ext.experiments.programs.segmentation import main  # noqa: E402

if __name__ == "__main__":
    main()
