"""Fine-tune a text-to-image diffusion model with per-pixel (PXPO) or per-image (DDPO) rewards.

Usage (after ``pip install -e .`` in the repository root)::

    python python/train.py                                     # configs/default.yaml: embedded model, colour reward
    python python/train.py --config configs/colour_ddpo.yaml   # the DDPO baseline on the same task
    python python/train.py --num-epochs 5 --reward-kwargs channel=red --output-dir runs/less_red
    accelerate launch python/train.py --config configs/sd15_colour.yaml   # Stable Diffusion 1.5 on GPUs
    python python/train.py --help                              # every option with its default

See docs/cli.md for the options, the config files and what a run folder contains.
"""
try:
    from pxpo_ext.cli import train_main
except ModuleNotFoundError as err:
    if err.name != "pxpo_ext":
        raise
    raise SystemExit("pxpo is not installed in this Python: run `pip install -e .` in the repository root "
                     "(see the README), then run this script again") from None

if __name__ == "__main__":
    train_main()
