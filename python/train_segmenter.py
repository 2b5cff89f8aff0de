"""Train the shape segmenter that pxpo ships for its embedded model (the ``remove_circles`` reward).

Usage (after ``pip install -e .`` in the repository root)::

    python python/train_segmenter.py                 # 5 to 11 minutes on a shared 2-core CPU, no GPU
    python python/train_segmenter.py --steps 50 --out /tmp/seg.safetensors   # smoke run
    python python/train_segmenter.py --judge-agreement   # shipped weights vs the judge on the embedded model
    python python/train_segmenter.py --help

The data, augmentations and held-out metrics are described in :mod:`pxpo_ext.rewards.segmenter.training`
and docs/rewards.md.
"""
from pxpo_ext.cli import quiet_torchvision_fallback

quiet_torchvision_fallback()  # first: transformers warns while diffusers is imported

from pxpo_ext.rewards.segmenter.training import main  # noqa: E402

if __name__ == "__main__":
    main()
