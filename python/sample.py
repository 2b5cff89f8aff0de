"""Render prompts with a diffusion model (optionally with LoRA weights trained by train.py) into one PNG grid.

Usage (after ``pip install -e .`` in the repository root)::

    python python/sample.py --prompt "a red circle on a blue background" --out grid.png
    python python/sample.py --prompts-file prompts.txt --lora runs/pxpo/lora --reward colour --out after.png
    python python/sample.py --model stable-diffusion-v1-5/stable-diffusion-v1-5 --num-steps 50 \
        --prompt "a cat" --device cuda
    python python/sample.py --help

With ``--reward`` each image is shown beside its reward heatmap and its mean reward is printed.
See docs/cli.md.
"""
try:
    from pxpo_ext.cli import sample_main
except ModuleNotFoundError as err:
    if err.name != "pxpo_ext":
        raise
    raise SystemExit("pxpo is not installed in this Python: run `pip install -e .` in the repository root "
                     "(see the README), then run this script again") from None

if __name__ == "__main__":
    sample_main()
