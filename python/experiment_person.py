"""Experiment 3 (a person): one prompt and seed, a scripted person who wants one region changed.

Usage (after ``pip install -e .`` in the repository root)::

    python python/experiment_person.py                 # a few minutes on a 2-core CPU
    python python/experiment_person.py --prompt "a blue square on a yellow background" --seed 3
    python python/experiment_person.py --prompt "a red triangle and a blue triangle on a yellow background" \
        --seed 3 --region extra --colour background    # remove what the prompt did not ask for
    python python/experiment_person.py ... --colour keep   # the same run's control: keep it as it is
    python python/experiment_person.py --quick         # seconds, tiny settings (smoke test)
    python python/experiment_person.py --help

What it measures and how: :mod:`pxpo_ext.experiments.programs.person` and docs/experiments.md.
"""
from pxpo_ext.cli import quiet_torchvision_fallback

quiet_torchvision_fallback()  # first: transformers warns while diffusers is imported

from pxpo_ext.experiments.programs.person import main  # noqa: E402

if __name__ == "__main__":
    main()
