"""Train pxpo's embedded text-to-image model (``pxpo_ext/embedded/tiny-shapes``) from scratch.

Usage (after ``pip install -e .`` in the repository root)::

    python python/pretrain_tiny.py --quick --out /tmp/tiny               # a seconds-long smoke run
    python python/pretrain_tiny.py --device cuda --max-minutes 3 ...     # a time-boxed run (docs/embedded_model.md)
    python python/pretrain_tiny.py --init-from FOLDER --lr 3e-4 ...      # continue training a saved pipeline
    python python/pretrain_tiny.py --evaluate                            # judge samples, time sampling, draw a grid
    python python/pretrain_tiny.py --help                                # every option with its default

The stages and their options are documented in :mod:`pxpo_ext.embedded.pretrain` and
docs/embedded_model.md.
"""
from pxpo_ext.cli import quiet_torchvision_fallback

quiet_torchvision_fallback()  # first: transformers warns while diffusers is imported

from pxpo_ext.embedded.pretrain import main  # noqa: E402

if __name__ == "__main__":
    main()
