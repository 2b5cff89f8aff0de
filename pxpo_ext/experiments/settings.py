"""Shared settings, command-line options and start of the experiments' programs (``programs/``).

Every experiment trains with the same sampler and batch (16 images per epoch: 2 batches of 8,
10 DDIM steps, eta 1, guidance 5) and otherwise the trainer's defaults, so results compare.
``--quick`` shrinks everything to seconds for the smoke test (``tests/test_experiments.py``);
its numbers mean nothing.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from .provenance import Provenance, model_fingerprint, script_path

TRAIN_CONFIG = {"sample_batch_size": 8, "sample_num_batches_per_epoch": 2, "train_batch_size": 8,
                "sample_num_steps": 10}
QUICK_CONFIG = {"sample_batch_size": 2, "sample_num_batches_per_epoch": 1, "train_batch_size": 2,
                "sample_num_steps": 3}
FIGURES = "docs/figures"


def add_common_arguments(parser: argparse.ArgumentParser, runs_dir: str) -> None:
    parser.add_argument("--model", default=None,
                        help="diffusers Stable-Diffusion-style folder; default: the embedded model")
    parser.add_argument("--out", default=FIGURES, help="folder for the CSV, PNG and provenance files")
    parser.add_argument("--runs-dir", default=runs_dir, help="folder for the training runs (metrics, LoRA weights)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (per worker process where there are several)")
    parser.add_argument("--quick", action="store_true", help="a seconds-long smoke run with tiny settings")
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                        help="other trainer options for every run, as in `python python/train.py --help` "
                             "(e.g. sample_guidance_scale=3 advantage_std_floor=0.01); not those this program "
                             "sets itself")


def add_kl_argument(parser: argparse.ArgumentParser, holds: str) -> None:
    """``--kl-coef``: the weight of the KL penalty toward the initial model (``train_kl_coef``)."""
    parser.add_argument("--kl-coef", type=float, default=0.0,
                        help=f"weight of the KL penalty toward the initial model (train_kl_coef; 0: off), which {holds}")


# What a program sets for each run from its own options (RunSpec, make_trainer): --set must not change them.
PROGRAM_OWNED = ("algorithm", "seed", "num_epochs", "output_dir", "model", "reward", "reward_kwargs", "prompts",
                 "train_learning_rate")


def set_options(args, owned=()) -> dict:
    """``--set``'s options, checked against PXPOConfig and against the keys the program sets
    (:data:`PROGRAM_OWNED` and ``owned``); a bad one ends the program with an error."""
    from ..cli import ConfigError, parse_config_pairs
    from ..trainer import PXPOConfig

    try:
        extra = parse_config_pairs(args.set, PXPOConfig, "--set")
    except ConfigError as err:
        raise SystemExit(f"error: {err}") from None
    clash = sorted(set(extra) & (set(PROGRAM_OWNED) | set(owned)))
    if clash:
        raise SystemExit(f"error: --set {', '.join(clash)}: this program sets {'it' if len(clash) == 1 else 'them'} "
                         "itself; use its own options (--help)")
    return extra


def train_config(args, **overrides) -> dict:
    """The PXPOConfig fields every run of the experiment shares: the shared settings, the program's
    ``overrides``, then ``--set``'s."""
    return {**(QUICK_CONFIG if args.quick else TRAIN_CONFIG), **overrides, **set_options(args, overrides)}


def start(experiment: str, args, argv) -> tuple[Provenance, Path]:
    """Sets the threads and opens the experiment's record (command, machine, model): ``(record, out folder)``."""
    torch.set_num_threads(max(1, args.threads))
    record = Provenance(experiment, script_path(f"experiment_{experiment}"), argv)
    record.add(model=model_fingerprint(args.model), set_options=set_options(args))  # checked before any work
    return record, Path(args.out)
