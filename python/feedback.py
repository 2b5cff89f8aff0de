"""Fine-tune a diffusion model on a person's feedback about one image (PXPO's third experiment).

Usage (after ``pip install -e .`` in the repository root)::

    python python/feedback.py                                  # a web page at http://127.0.0.1:8765/
    python python/feedback.py --prompt "a red star on a white background" --seed 3
    python python/feedback.py --like-mask like.png --dislike-mask dislike.png --rounds 3   # no browser
    python python/feedback.py --help

See docs/rewards.md.
"""
from pxpo_ext.cli import quiet_torchvision_fallback

quiet_torchvision_fallback()  # first: transformers warns while diffusers is imported

from pxpo_ext.feedback.cli import main  # noqa: E402

if __name__ == "__main__":
    main()
