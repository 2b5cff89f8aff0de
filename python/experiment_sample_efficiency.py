"""Sample efficiency on the colour task ("less blue"): PXPO against DDPO from the same initial model.

Usage (after ``pip install -e .`` in the repository root)::

    python python/experiment_sample_efficiency.py                 # the full experiment (about 10 min on an idle 2-core CPU)
    python python/experiment_sample_efficiency.py --quick         # seconds, tiny settings (smoke test)
    python python/experiment_sample_efficiency.py --help

What it measures and how: :mod:`pxpo_ext.experiments.programs.sample_efficiency` and docs/experiments.md.
"""
from pxpo_ext.cli import quiet_torchvision_fallback

quiet_torchvision_fallback()  # first: transformers warns while diffusers is imported

from pxpo_ext.experiments.programs.sample_efficiency import main  # noqa: E402

if __name__ == "__main__":
    main()
