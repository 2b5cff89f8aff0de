"""Experiment 1 (colour, "less blue"): mean reward before and after PXPO, sample grids, side effects.

Trains PXPO on the embedded model with the colour reward (R = -blue per pixel) on the one-object
scene captions, then renders a fixed held-out set (prompts x seeds) before and after and measures:
the mean reward and mean blue; prompt fidelity judged by the scene generator's ground truth
(pxpo_ext.judge), overall and split by captions that name blue or not; and diversity (RMS
difference between seeds of one prompt, and between prompts). DDPO runs too (``--methods``), from
the same model, seed and budget, each method at the learning rate the sample-efficiency search
chose for it, for the same measures. Writes, under --out:

    colour_grid.png           before (top) and after (bottom) the first method, one seed per prompt
    colour_results.csv        one row per model (initial, pxpo, ddpo): reward, fidelity, diversity
    colour_curve.csv          the training reward per epoch
    colour_provenance.json    command, machine, seeds, wall time

This module is the program; ``python/experiment_colour.py`` calls :func:`main` (its docstring
has example commands).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from pxpo_ext.experiments import figures, settings
from pxpo_ext.experiments.evaluation import eval_set, mean_rewards, side_effects
from pxpo_ext.experiments.runs import RunSpec, train_run
from pxpo_ext.rewards import get_reward
from pxpo_ext.scenes import prompts as scene_prompts


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    settings.add_common_arguments(parser, "runs/experiments/colour")
    parser.add_argument("--epochs", type=int, default=20, help="training epochs (16 reward queries each)")
    parser.add_argument("--lr", type=float, default=1e-3, help="PXPO's learning rate (its choice in the sample-efficiency search)")
    parser.add_argument("--ddpo-lr", type=float, default=3e-3, help="DDPO's learning rate (its choice in the same search)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--methods", nargs="+", default=["pxpo", "ddpo"], choices=["pxpo", "ddpo"])
    parser.add_argument("--eval-prompts", type=int, default=16, help="held-out captions")
    parser.add_argument("--eval-seeds", type=int, default=3, help="seeds per held-out caption")
    args = parser.parse_args(argv)
    if args.quick:
        args.epochs, args.eval_prompts, args.eval_seeds = 1, 2, 2
    return args


def measure(images, prompts, seeds, reward_fn) -> dict:
    rewards = mean_rewards(reward_fn, images, prompts, seeds)
    return {"reward": sum(rewards) / len(rewards), "blue": float(images[:, 2].mean()),
            **side_effects(images, prompts, mentions="blue")}


def main(argv=None):
    args = parse_args(argv)
    record, out = settings.start("colour", args, argv)
    reward_fn = get_reward("colour")
    captions = scene_prompts(args.eval_prompts, seed=1234, max_objects=1, two_tone=False)
    prompts, seeds = eval_set(captions, args.eval_seeds)
    rows, curves, grids = [], [], {}
    lrs = {"pxpo": args.lr, "ddpo": args.ddpo_lr}
    for method in args.methods:
        spec = RunSpec(name=f"colour-{method}", algorithm=method, seed=args.seed, epochs=args.epochs,
                       output_dir=str(Path(args.runs_dir) / method), prompts=scene_prompts(max_objects=1),
                       reward="colour", model=args.model,
                       config=settings.train_config(args, train_learning_rate=lrs[method]),
                       eval_prompts=prompts, eval_seeds=seeds, threads=args.threads)
        before, result = train_run(spec, before=True)
        if not rows:
            rows.append({"model": "initial", **measure(before, prompts, seeds, reward_fn)})
            grids["before"] = before
        rows.append({"model": f"{method} ({result.queries[-1]} queries)",
                     **measure(result.eval_images, prompts, seeds, reward_fn), "train_seconds": round(result.seconds, 1)})
        grids[method] = result.eval_images
        curves += [{"method": method, "lr": lrs[method], "seed": args.seed, **point} for point in result.curve]
        print(f"{method}: training reward {result.rewards[0]:.4f} -> {result.rewards[-1]:.4f}, {result.seconds:.0f} s")
    figures.write_csv(out / "colour_results.csv", rows)
    figures.write_csv(out / "colour_curve.csv", curves)

    first = list(range(0, len(prompts), args.eval_seeds))  # seed 0 of each caption
    shown = [prompts[i] for i in first]
    before, after = grids["before"][first], grids[args.methods[0]][first]
    figures.save_png(figures.before_after_figure(
        before, after, shown, mean_rewards(reward_fn, before, shown, [0] * len(first)),
        mean_rewards(reward_fn, after, shown, [0] * len(first))), out / "colour_grid.png")
    record.add(seeds={"training": args.seed, "evaluation": list(range(args.eval_seeds))}, epochs=args.epochs,
               lrs={m: lrs[m] for m in args.methods}, eval_captions=captions, results=rows)
    record.write(out)
    record.print_results(out, rows)
    return record.record

