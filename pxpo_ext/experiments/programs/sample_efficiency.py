"""Sample efficiency on the colour task ("less blue"), or any reward: PXPO against DDPO from the same initial model.

Both methods get the same reward-query budget (epochs x 16 images), the same 16 training captions
in every epoch (so the epoch's mean reward moves only with the policy), the same search over the
learning rate (each value at --grid-seed, chosen by the mean reward of the last two epochs), and
the same seeds at the chosen rate (a seed's run from the search is reused, not rerun). Two runs
with the same seed draw the same initial noise in their first epoch. ``--reward`` replaces the
colour reward with any other, registered or your own (``file.py:name``). A reward that says only
"less blue" can be gained by breaking the images (black ones score best), so every run's final weights
then draw each training caption ``--judge-images`` times and :mod:`pxpo_ext.judge` checks them
against the caption: background as asked, named objects drawn as asked (and, for the others,
whether they were misshapen, mis-sized or absent: a rise in absent objects is erasing), and the
share of nearly black images. Writes, under --out
(default docs/figures):

    sample_efficiency.png            mean reward vs queries, band = min..max over seeds
    sample_efficiency_lr_grid.png    the learning-rate search of each method
    sample_efficiency_runs.csv       every run, every epoch
    sample_efficiency_summary.csv    per method: chosen lr, final reward over seeds, held-out reward, the
                                     judged prompt fidelity of the final weights (before: the initial model's); the
                                     queries PXPO needs to reach DDPO's final reward, and both need to
                                     reach DDPO's best; PXPO - DDPO seed by seed (final, mean over the
                                     run, held out) with a 95% bootstrap interval over seeds
    sample_efficiency_provenance.json command, machine, seeds, wall time, the headline numbers

This module is the program; ``python/experiment_sample_efficiency.py`` calls :func:`main` (its docstring
has example commands).
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path

from pxpo_ext.cli import add_reward_arguments, build_reward
from pxpo_ext.experiments import curves, figures, settings
from pxpo_ext.experiments.evaluation import eval_set, judged_fidelity
from pxpo_ext.experiments.runs import RunSpec, evaluate_rewards, make_trainer, run_all
from pxpo_ext.scenes import prompts as scene_prompts
from pxpo_ext.trainer.prompts import get_prompt_fn

METHODS = ("pxpo", "ddpo")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    settings.add_common_arguments(parser, "runs/experiments/sample_efficiency")
    parser.add_argument("--epochs", type=int, default=15, help="epochs per run (16 reward queries each)")
    parser.add_argument("--lrs", type=float, nargs="+", default=[1e-3, 3e-3, 1e-2], help="learning rates searched")
    parser.add_argument("--grid-seed", type=int, default=0, help="seed of the learning-rate search")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds at the chosen learning rate")
    parser.add_argument("--timestep-fraction", type=float, default=0.5,
                        help="fraction of each trajectory's steps trained on (both methods)")
    parser.add_argument("--captions", choices=["plain", "default-run"], default="plain",
                        help="the 16 training captions: 'plain', one object on a plain background (generator seed 7; "
                             "little blue to remove), or 'default-run', the 16 that `python python/train.py` cycles")
    parser.add_argument("--accumulation", type=int, default=1,
                        help="minibatches per optimiser step (2 = one step per 16-image epoch, as the default run)")
    parser.add_argument("--jobs", type=int, default=2, help="runs in parallel (worker processes)")
    parser.add_argument("--eval-prompts", type=int, default=8, help="held-out prompts (2 seeds each) scored after training")
    parser.add_argument("--judge-images", type=int, default=2,
                        help="images per training caption drawn after training and judged for prompt fidelity (0: skip)")
    settings.add_kl_argument(parser, "holds the images near the initial model's (both methods)")
    add_reward_arguments(parser, "colour", "the per-pixel feedback both methods learn from")
    args = parser.parse_args(argv)
    # Built here so that a bad reward stops the program before any run; the initial model's trainer reuses it.
    args.reward_fn, args.reward_options = build_reward(args, parser)
    if args.quick:
        args.epochs, args.lrs, args.seeds, args.eval_prompts = 2, args.lrs[:2], args.seeds[:2], 2
        args.judge_images = min(args.judge_images, 1)
    return args


JUDGED = ("background", "objects", "wrong_shape", "wrong_size", "absent", "all", "dark", "reward")


def _judged_columns(judged: dict | None, suffix: str = "") -> dict:
    """``judged_<rate><suffix>`` columns of a judged fidelity (evaluation.judged_fidelity); none when not judged."""
    return {f"judged_{k}{suffix}": judged[k] for k in JUDGED} if judged else {}


def _task(args) -> str:
    """The figure's name for what is learned: the default colour task, or the reward and its options."""
    if args.reward == "colour" and not args.reward_options:
        return "colour task (less blue)"
    options = ", ".join(f"{k}={v}" for k, v in args.reward_options.items())
    return f"reward {args.reward}" + (f" ({options})" if options else "")


def main(argv=None):
    args = parse_args(argv)
    record, out = settings.start("sample_efficiency", args, argv)
    runs_dir = Path(args.runs_dir)
    config = settings.train_config(args, train_timestep_fraction=args.timestep_fraction,
                                   train_gradient_accumulation_steps=args.accumulation, train_kl_coef=args.kl_coef)
    samples_per_epoch = config["sample_batch_size"] * config["sample_num_batches_per_epoch"]
    if args.captions == "plain":
        train_prompts = scene_prompts(samples_per_epoch, seed=7, max_objects=1, two_tone=False)
    else:  # the captions of PXPOConfig(prompts="cycle:16:scenes", seed=0), the default run's
        train_prompts = get_prompt_fn(f"cycle:{samples_per_epoch}:scenes", 0).prompts
    eval_prompts, eval_seeds = eval_set(scene_prompts(args.eval_prompts, seed=1234, max_objects=1, two_tone=False), 2)
    threads = max(1, args.threads // max(1, args.jobs))

    def spec(method, lr, seed, phase):
        return RunSpec(name=f"{phase}-{method}-lr{lr:g}-s{seed}", algorithm=method, seed=seed, epochs=args.epochs,
                       output_dir=str(runs_dir / phase / f"{method}_lr{lr:g}_s{seed}"), prompts=train_prompts,
                       cycle_prompts=True,
                       reward=args.reward, reward_kwargs=args.reward_options, model=args.model,
                       config={**config, "train_learning_rate": lr},
                       eval_prompts=eval_prompts, eval_seeds=eval_seeds, threads=threads,
                       judge_images=args.judge_images)

    # The initial model's held-out reward and judged fidelity (the same for every run).
    initial = make_trainer(spec("pxpo", args.lrs[0], args.grid_seed, "initial"), reward_fn=args.reward_fn)
    _, initial_eval = evaluate_rewards(initial, initial.reward_fn, eval_prompts, eval_seeds)
    initial_judged = judged_fidelity(initial, train_prompts, args.judge_images) if args.judge_images else {}
    initial.close()

    grid_results = run_all([spec(m, lr, args.grid_seed, "grid") for m in METHODS for lr in args.lrs], args.jobs)
    grid_scores = {m: {r.spec.learning_rate: curves.final_reward(r.rewards) for r in grid_results
                       if r.spec.algorithm == m} for m in METHODS}
    chosen = {m: curves.best_setting(grid_scores[m]) for m in METHODS}
    print(f"learning-rate search (final reward, seed {args.grid_seed}; chosen by reward alone): {grid_scores}")
    reused = {(r.spec.algorithm, r.spec.seed): r for r in grid_results if r.spec.learning_rate == chosen[r.spec.algorithm]}
    fresh = run_all([spec(m, chosen[m], s, "seeds") for m in METHODS for s in args.seeds if (m, s) not in reused],
                    args.jobs)
    queue = list(fresh)
    seed_results = [reused.get((m, s)) or queue.pop(0) for m in METHODS for s in args.seeds]

    # Each run's held-out reward and judged fidelity ride on its rows, so that the CSV alone allows a
    # re-analysis seed by seed.
    rows = [{"phase": r.spec.name.split("-")[0], "method": r.spec.algorithm, "lr": r.spec.learning_rate,
             "seed": r.spec.seed, "kl_coef": args.kl_coef, **point, "run_seconds": round(r.seconds, 1),
             "held_out_reward": r.eval_reward, **_judged_columns(r.fidelity)}
            for r in grid_results + fresh for point in r.curve]
    figures.write_csv(out / "sample_efficiency_runs.csv", rows)

    stacked = {m: curves.stack_curves([r.queries for r in seed_results if r.spec.algorithm == m],
                                      [r.rewards for r in seed_results if r.spec.algorithm == m]) for m in METHODS}
    finals = {m: [curves.final_reward(run) for run in stacked[m][1]] for m in METHODS}
    queries = stacked["pxpo"][0]
    budget = float(queries[-1])
    ddpo_mean = stacked["ddpo"][1].mean(axis=0)
    ddpo_final = curves.final_reward(ddpo_mean)
    pxpo_curve = curves.smooth(stacked["pxpo"][1].mean(axis=0))
    reach = curves.queries_to_reach(queries, pxpo_curve, ddpo_final)
    per_seed_reach = [curves.queries_to_reach(queries, curves.smooth(run), ddpo_final) for run in stacked["pxpo"][1]]
    # A ratio against a baseline that never rose above its own start measures nothing: withhold it.
    ddpo_improved = ddpo_final > float(stacked["ddpo"][1][:, 0].mean())
    gain = budget / reach if ddpo_improved and math.isfinite(reach) and reach > 0 else math.nan
    # DDPO's final reward can sit below its own best when training turns unstable late, which
    # flatters the ratio above; the level both reach at their best is the sturdier yardstick.
    ddpo_curve = curves.smooth(ddpo_mean)
    ddpo_best = float(ddpo_curve.max())
    best_reach = {"pxpo": curves.queries_to_reach(queries, pxpo_curve, ddpo_best),
                  "ddpo": curves.queries_to_reach(queries, ddpo_curve, ddpo_best)}

    held_outs = {m: [r.eval_reward for r in seed_results if r.spec.algorithm == m] for m in METHODS}
    # Seed by seed (runs with one seed share their first epoch's noise): is PXPO's edge more than the seed spread?
    paired = {"final_reward": curves.paired_difference(finals["pxpo"], finals["ddpo"]),
              "mean_reward_after_start": curves.paired_difference(*(curves.mean_after_start(stacked[m][1])
                                                                    for m in METHODS)),
              "held_out_reward": curves.paired_difference(held_outs["pxpo"], held_outs["ddpo"])}

    summary = []
    for m in METHODS:
        runs = [r for r in seed_results if r.spec.algorithm == m]
        held_out = held_outs[m]
        judged = {k: sum(r.fidelity[k] for r in runs) / len(runs) for k in JUDGED} if args.judge_images else None
        summary.append({
            "method": m, "chosen_lr": chosen[m], "lrs_tried": " ".join(f"{lr:g}" for lr in args.lrs),
            "seeds": " ".join(str(s) for s in args.seeds), "queries": int(budget),
            "reward_first_epoch_mean": float(stacked[m][1][:, 0].mean()),
            "final_reward_mean": float(sum(finals[m]) / len(finals[m])),
            "final_reward_min": min(finals[m]), "final_reward_max": max(finals[m]),
            "held_out_reward_before": sum(initial_eval) / len(initial_eval),
            "held_out_reward_after_mean": sum(held_out) / len(held_out),
            "held_out_reward_after_min": min(held_out), "held_out_reward_after_max": max(held_out),
            "run_seconds_mean": sum(r.seconds for r in runs) / len(runs),
            **_judged_columns(initial_judged, "_before"), **_judged_columns(judged, "_mean"),
        })
    summary.append({"method": "pxpo queries to reach ddpo's final reward", "queries": reach,
                    "final_reward_mean": ddpo_final, "chosen_lr": None,
                    "seeds": " ".join(f"{q:.0f}" if math.isfinite(q) else "never" for q in per_seed_reach)})
    summary.append({"method": "queries to reach ddpo's best (seed-mean curve)", "final_reward_mean": ddpo_best,
                    "queries": best_reach["pxpo"], "chosen_lr": None, "seeds": f"ddpo {best_reach['ddpo']:.0f}"})
    for name, d in paired.items():
        summary.append({"method": f"pxpo - ddpo, {name.replace('_', ' ')}, paired over seeds",
                        "final_reward_mean": d["mean"], "ci95_low": d["ci_low"], "ci95_high": d["ci_high"],
                        "seeds": f"pxpo higher in {d['a_higher']} of {d['seeds']}", "chosen_lr": None})
    figures.write_csv(out / "sample_efficiency_summary.csv", summary)

    figures.save_png(figures.efficiency_figure(
        {f"{m.upper()} (lr {chosen[m]:g})": stacked[m] for m in METHODS}, target=ddpo_final,
        reach=reach if ddpo_improved else None,  # reaching a level below DDPO's own start measures nothing
        title=f"{_task(args)}{f', KL {args.kl_coef:g}' if args.kl_coef else ''}, {len(args.seeds)} seeds, "
              "band: min to max over seeds"),
        out / "sample_efficiency.png")
    grid = {m.upper(): {r.spec.learning_rate: (r.queries, r.rewards) for r in grid_results if r.spec.algorithm == m}
            for m in METHODS}
    figures.save_png(figures.lr_grid_figure(grid), out / "sample_efficiency_lr_grid.png")

    record.add(seeds={"lr_search": args.grid_seed, "final": args.seeds}, epochs=args.epochs, captions=args.captions,
               samples_per_epoch=samples_per_epoch, train_prompts=train_prompts, kl_coef=args.kl_coef,
               reward=args.reward, reward_kwargs=args.reward_options,
               judge_images=args.judge_images, judged_initial=initial_judged,
               judged_final={m: [r.fidelity for r in seed_results if r.spec.algorithm == m] for m in METHODS},
               train_config=config, lr_search=grid_scores, chosen_lr=chosen, ddpo_final_reward=ddpo_final,
               pxpo_queries_to_reach_ddpo_final=reach, pxpo_per_seed_queries_to_reach=per_seed_reach,
               budget=budget, ddpo_improved=ddpo_improved, query_gain=gain, ddpo_best_reward=ddpo_best,
               queries_to_reach_ddpo_best=best_reach, paired_over_seeds=paired, summary=summary, jobs=args.jobs)
    record.write(out)
    for row in summary:
        print(row)
    print(f"DDPO final reward {ddpo_final:.4f} after {budget:.0f} queries; PXPO reaches it after "
          f"{reach:.1f} queries (seed-mean curve, 2-epoch trailing mean)")
    print(f"DDPO's best reward (seed-mean, 2-epoch trailing mean) {ddpo_best:.4f}: DDPO reaches it after "
          f"{best_reach['ddpo']:.0f} queries, PXPO after {best_reach['pxpo']:.0f} (nan: never)")
    for name, d in paired.items():
        print(f"PXPO - DDPO, {name.replace('_', ' ')}: {d['mean']:+.4f} (95% bootstrap interval over seeds "
              f"{d['ci_low']:+.4f} to {d['ci_high']:+.4f}); PXPO higher in {d['a_higher']} of {d['seeds']} seeds")
    for row in summary[:len(METHODS)]:
        if args.judge_images:
            print(f"{row['method'].upper()} judged on the training captions ({args.judge_images} images each): "
                  + ", ".join(f"{k} {row[f'judged_{k}_before']:.3f} -> {row[f'judged_{k}_mean']:.3f}" for k in JUDGED)
                  + " (initial model -> mean of the seeds' final weights)")
    if ddpo_improved:
        print(f"PXPO needs {gain:.2f}x fewer queries to reach DDPO's final reward")
    else:
        print("DDPO ended below its initial reward: no query ratio is reported (it would only measure that "
              "DDPO did not learn within this budget); compare the final and held-out rewards instead")
    record.print_results(out)
    return record.record

