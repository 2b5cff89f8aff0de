"""Experiment 3 (a person): one prompt and seed, a scripted person who wants one region changed.

The person points at the object the caption names in the initial image (found by
pxpo_ext.judge; a centred square if none is found), with --region extra at an object the caption
does not name, or with --region top/bottom at that half of the background, and asks "make this
red (--colour; 'background' for the caption's background colour, i.e. "remove this"; 'keep' for
the region's own colour, the control that shows what training alone does), leave the rest as it
is": each round, PXPO trains --epochs-per-round epochs of 8 samples of the prompt, started from
the noises of --noise-seeds seeds in turn (the seed's own first), with the person's per-pixel
marks on every sample (pxpo_ext.experiments.person: the region in the colour; the rest of the
canvas as in the image the person saw, as the initial model drew it from the sample's own noise,
or unmarked: --outside), then the image for the prompt and seed is rendered again. It stops when
at least --done of the region has the colour (the judge's palette segmentation) and, unless the
rest is unmarked, the judge finds the same objects outside the region as before; or after
--max-rounds (a control always runs them all). Writes, under --out:

    person_rounds.png          the region, the image before, and after every round
    person_rounds.csv          per round: the colour's fraction of the region, RMS change outside,
                               the objects found outside, reward
    person_provenance.json     command, machine, prompt, seed, rounds, wall time

This module is the program; ``python/experiment_person.py`` calls :func:`main` (its docstring
has example commands).
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from pxpo_ext import plots
from pxpo_ext.experiments import figures, person, settings
from pxpo_ext.experiments.runs import CURVE_KEYS, RunSpec, make_trainer
from pxpo_ext.trainer.prompts import CyclingPrompts


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    settings.add_common_arguments(parser, "runs/experiments/person")
    parser.add_argument("--prompt", default="a blue circle on a white background")
    parser.add_argument("--seed", type=int, default=0, help="the seed of the image's noise (and of training)")
    parser.add_argument("--colour", default="red",
                        help="the colour the person wants in the region; 'background': the caption's background colour "
                             "(\"remove this\"); 'keep': the region's own colour in the image (the control: \"keep "
                             "this as it is\")")
    parser.add_argument("--lr", type=float, default=1e-4)
    settings.add_kl_argument(parser, "holds back what the marks do not ask to change")
    parser.add_argument("--noise-seeds", type=int, default=8,
                        help="samples start from the noises of seeds SEED..SEED+N-1 in turn; with 1 they all share the "
                             "seed's noise and, on the embedded model, differ too little to rank (docs/experiments.md)")
    parser.add_argument("--region", choices=["object", "extra", "top", "bottom"], default="object",
                        help="what the person points at: the caption's object, an object the caption does not name "
                             "('extra'), or the top or bottom half of the background (\"make the top half <colour>\")")
    parser.add_argument("--region-seed", type=int, default=None,
                        help="point at the caption's object as drawn from this seed's noise instead (\"put it here\")")
    parser.add_argument("--outside", choices=["keep", "keep-own-noise", "unmarked"], default="keep",
                        help="'keep': the rest of the canvas is liked as in the image the person saw; "
                             "'keep-own-noise': as in the initial model's image from the sample's own noise; "
                             "'unmarked': only the region is marked (weight 0 elsewhere)")
    parser.add_argument("--epochs-per-round", type=int, default=2)
    parser.add_argument("--max-rounds", type=int, default=8)
    parser.add_argument("--done", type=float, default=0.75,
                        help="stop when this fraction of the region has the colour and (unless --outside unmarked) "
                             "the judge finds the same objects outside the region as in the image the person saw")
    args = parser.parse_args(argv)
    if args.quick:
        args.max_rounds, args.epochs_per_round = 2, 1
    return args


def rounds_figure(images, titles, region):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(1.5 * (len(images) + 1), 1.9))
    ax = fig.add_subplot(1, len(images) + 1, 1)
    ax.imshow(region.numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.set_title("region", fontsize=7)
    ax.set_axis_off()
    for k, (image, title) in enumerate(zip(plots.images_to_hwc(images), titles)):
        ax = fig.add_subplot(1, len(images) + 1, k + 2)
        ax.imshow(image, interpolation="nearest")
        ax.contour(region.numpy(), levels=[0.5], colors="white", linewidths=0.6)
        ax.set_title(title, fontsize=7)
        ax.set_axis_off()
    return fig


def main(argv=None):
    args = parse_args(argv)
    record, out = settings.start("person", args, argv)
    config = settings.train_config(args, train_learning_rate=args.lr, train_kl_coef=args.kl_coef,
                                   sample_num_batches_per_epoch=1,
                                   per_prompt_stat_tracking=False, advantage_baseline="location")
    config["train_batch_size"] = config["sample_batch_size"]
    spec = RunSpec(name="person", algorithm="pxpo", seed=args.seed, epochs=args.max_rounds * args.epochs_per_round,
                   output_dir=str(Path(args.runs_dir) / "pxpo"), prompts=[args.prompt], model=args.model,
                   config=config, threads=args.threads)
    if args.noise_seeds < 1:
        raise SystemExit(f"--noise-seeds must be at least 1, got {args.noise_seeds}")
    try:
        colour = person.background_colour(args.prompt) if args.colour == "background" else args.colour
    except ValueError as err:
        raise SystemExit(f"--colour background: {err}") from None
    prompt_fn = CyclingPrompts([args.prompt] * args.noise_seeds, noise_seed=args.seed)
    # The reward is set once the initial image is known; the trainer needs one to start with.
    holder = {}
    trainer = make_trainer(spec, reward_fn=lambda *a: holder["person"](*a), prompt_fn=prompt_fn)
    start = time.time()
    try:
        original = trainer.generate([args.prompt], [args.seed])[0].cpu()
        pointed = original if args.region_seed is None else trainer.generate([args.prompt], [args.region_seed])[0].cpu()
        try:
            if args.region == "object":
                region, how = person.target_region(pointed, args.prompt)
            elif args.region == "extra":
                region, how = person.extra_object(pointed, args.prompt)
            else:
                region, how = person.background_half(pointed, args.region)
            if args.colour == "keep":
                colour = person.region_colour(original, region)
        except ValueError as err:
            raise SystemExit(f"--region {args.region} --colour {args.colour}: {err}") from None
        if args.region_seed is not None:
            how += f" in the image of seed {args.region_seed}"
        before = None
        if args.outside == "keep-own-noise":
            before = {s: original if s == args.seed else trainer.generate([args.prompt], [s])[0].cpu()
                      for s in range(args.seed, args.seed + args.noise_seeds)}
        holder["person"] = person.RegionColourPerson(region, colour, original, keep_outside=args.outside != "unmarked",
                                                     before_by_seed=before)
        # "Leave the rest as it is", object by object: the judge must find the same objects outside the region.
        rest = person.objects_outside(original, region)
        fraction = person.colour_fraction(original, region, colour)
        images, titles = [original], [f"before: {fraction:.0%} {colour}"]
        rows = [{"round": 0, "queries": 0, "colour_fraction": fraction,
                 "outside_rms_change": 0.0, "objects_outside": "; ".join(rest), "rest_kept": True, "seconds": 0.0}]
        epoch, done_round = 0, None
        for rnd in range(1, args.max_rounds + 1):
            for _ in range(args.epochs_per_round):
                metrics = trainer.step(epoch)
                epoch += 1
            image = trainer.generate([args.prompt], [args.seed])[0].cpu()
            fraction = person.colour_fraction(image, region, colour)
            now = person.objects_outside(image, region)
            rows.append({"round": rnd, "queries": metrics["samples_seen"], "colour_fraction": fraction,
                         "outside_rms_change": person.outside_change(image, original, region),
                         "objects_outside": "; ".join(now), "rest_kept": now == rest,
                         **{k: metrics.get(k) for k in CURVE_KEYS if k not in ("epoch", "samples_seen", "seconds")},
                         **({"reference_kl": metrics["reference_kl"]} if args.kl_coef else {}),
                         "seconds": round(time.time() - start, 1)})
            images.append(image)
            titles.append(f"round {rnd}: {fraction:.0%} {colour}")
            print(f"round {rnd}: {fraction:.0%} of the region {colour}, outside change "
                  f"{rows[-1]['outside_rms_change']:.3f}, outside the judge finds {now or 'nothing'}"
                  f"{'' if now == rest else f' (before: {rest or None})'}, {rows[-1]['seconds']:.0f} s")
            # A control ("keep") is met before it starts: it runs every round, to show what training alone does.
            if args.colour != "keep" and fraction >= args.done and (args.outside == "unmarked" or now == rest):
                done_round = rnd
                break
        trainer.save_pretrained(spec.output_dir)
    finally:
        trainer.close()
    figures.write_csv(out / "person_rounds.csv", rows)
    figures.save_png(rounds_figure(images, titles, region), out / "person_rounds.png", dpi=150)
    record.add(prompt=args.prompt, seed=args.seed, colour=colour, region=how,
               region_pixels=int((region > 0.5).sum()), region_kind=args.region, region_seed=args.region_seed,
               outside=args.outside, objects_outside_before=rest,
               lr=args.lr, kl_coef=args.kl_coef, noise_seeds=args.noise_seeds,
               epochs_per_round=args.epochs_per_round,
               samples_per_epoch=config["sample_batch_size"], done_threshold=args.done,
               rounds_to_done=done_round, rounds=rows)
    record.write(out)
    last = rows[-1]
    if args.colour == "keep":
        verdict = (f"control: after {args.max_rounds} rounds {last['colour_fraction']:.0%} of the region is still "
                   f"{colour}, rest {'kept' if last['rest_kept'] else 'changed'}")
    elif done_round:
        verdict = f"done after {done_round} round(s), {last['queries']} reward queries"
    else:
        verdict = (f"not done after {args.max_rounds} rounds ({last['colour_fraction']:.0%} {colour}, "
                   f"rest {'kept' if last['rest_kept'] else 'changed'})")
    print(f"region: {how}; {verdict}; wall time {record.record['wall_seconds']} s; files in {out}")
    return record.record

