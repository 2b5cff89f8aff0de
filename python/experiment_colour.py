"""Experiment 1 (colour, "less blue"): mean reward before and after PXPO, sample grids, side effects.

Usage (after ``pip install -e .`` in the repository root)::

    python python/experiment_colour.py                # about 15 min on a 2-core CPU
    python python/experiment_colour.py --quick        # seconds, tiny settings (smoke test)
    python python/experiment_colour.py --help

What it measures and how: :mod:`pxpo_ext.experiments.programs.colour` and docs/experiments.md.
"""
from pxpo_ext.cli import quiet_torchvision_fallback

quiet_torchvision_fallback()  # first: transformers warns while diffusers is imported

from pxpo_ext.experiments.programs.colour import main  # noqa: E402

if __name__ == "__main__":
    main()
