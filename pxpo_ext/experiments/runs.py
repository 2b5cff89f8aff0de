"""Training runs as data: a :class:`RunSpec` in, a :class:`RunResult` (curve, evaluation, time) out.

Specs hold only plain values (a reward by registered name, prompts as a list), so runs can go to
worker processes; :func:`run_all` runs them ``jobs`` at a time. Two specs that differ only in
``algorithm`` draw the same prompts and the same initial noise in every epoch (both come from
``seed``), so PXPO and DDPO are compared on identical queries until their weights diverge.
"""
from __future__ import annotations

import multiprocessing
import os
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

# Kept per epoch in a result: enough to plot and audit a run without its folder.
CURVE_KEYS = ("epoch", "samples_seen", "reward_mean", "reward_std", "approx_kl", "clipfrac", "loss", "seconds")

# Run seed s starts its cycled prompts from the noise of seeds s * stride + slot: no overlap between run seeds.
NOISE_SEED_STRIDE = 10_000

# Every run writes only what the experiments read: metrics.jsonl and the final LoRA.
QUIET_RUN = {"num_eval_images": 0, "save_freq": 0, "log_images_every": 0, "use_tensorboard": False,
             "reward_workers": 1}


@dataclass
class RunSpec:
    name: str
    algorithm: str
    seed: int
    epochs: int
    output_dir: str
    prompts: list[str]
    reward: str = "colour"
    reward_kwargs: dict = field(default_factory=dict)
    model: str | None = None  # None: the embedded model
    config: dict = field(default_factory=dict)  # any other PXPOConfig fields (learning rate, batch sizes, ...)
    eval_prompts: list[str] = field(default_factory=list)
    eval_seeds: list[int] = field(default_factory=list)
    threads: int = 1
    cycle_prompts: bool = False  # True: every epoch walks ``prompts`` in order from fixed noise (CyclingPrompts)
    judge_images: int = 0  # > 0: after training, draw each of ``prompts`` this many times and judge them

    @property
    def learning_rate(self) -> float:
        from ..trainer import PXPOConfig

        return float(self.config.get("train_learning_rate", PXPOConfig.train_learning_rate))


@dataclass
class RunResult:
    spec: RunSpec
    curve: list[dict]  # one dict of CURVE_KEYS per epoch
    eval_rewards: list[float]  # per evaluation image, after training
    eval_images: torch.Tensor | None  # (N, 3, H, W) in [0, 1], after training
    seconds: float
    fidelity: dict | None = None  # evaluation.judged_fidelity of the training prompts after training (judge_images)

    @property
    def queries(self) -> list[int]:
        return [int(r["samples_seen"]) for r in self.curve]

    @property
    def rewards(self) -> list[float]:
        return [float(r["reward_mean"]) for r in self.curve]

    @property
    def eval_reward(self) -> float | None:
        """The mean reward of the evaluation images after training (``None`` without an evaluation set)."""
        return sum(self.eval_rewards) / len(self.eval_rewards) if self.eval_rewards else None


def make_trainer(spec: RunSpec, reward_fn=None, prompt_fn=None, pipeline=None):
    """The :class:`~pxpo_ext.trainer.PXPOTrainer` for ``spec``; ``reward_fn``/``prompt_fn`` override the spec's."""
    from ..rewards import get_reward
    from ..trainer import PXPOConfig, PXPOTrainer, load_pipeline
    from ..trainer.prompts import CyclingPrompts, PromptSource

    config = PXPOConfig(**{**QUIET_RUN, **spec.config, "algorithm": spec.algorithm, "seed": spec.seed,
                           "num_epochs": spec.epochs, "output_dir": spec.output_dir, "model": spec.model,
                           "reward": spec.reward, "reward_kwargs": dict(spec.reward_kwargs)})
    reward_fn = reward_fn if reward_fn is not None else get_reward(spec.reward, **spec.reward_kwargs)
    if prompt_fn is None:
        prompt_fn = CyclingPrompts(spec.prompts, NOISE_SEED_STRIDE * spec.seed) if spec.cycle_prompts else PromptSource(spec.prompts, spec.seed, spec.name)
    return PXPOTrainer(config, reward_fn, prompt_fn, pipeline if pipeline is not None else load_pipeline(spec.model))


def evaluate_rewards(trainer, reward_fn, prompts: list[str], seeds: list[int], batch: int = 16):
    """``(images, per-image mean rewards)`` for fixed prompts and seeds under the trainer's current weights."""
    from .evaluation import generate, mean_rewards

    images = generate(trainer, prompts, seeds, batch)
    return images, mean_rewards(reward_fn, images, prompts, seeds)


def train_run(spec: RunSpec, before: bool = False) -> RunResult | tuple[torch.Tensor, RunResult]:
    """Train ``spec.epochs`` epochs, save the weights in ``spec.output_dir``, evaluate on the spec's fixed set.

    ``before=True`` also renders the fixed set under the initial weights and returns
    ``(those images, result)``.
    """
    from .evaluation import generate, judged_fidelity

    torch.set_num_threads(spec.threads)
    start = time.time()
    trainer = make_trainer(spec)
    try:
        initial = generate(trainer, spec.eval_prompts, spec.eval_seeds) if before else None
        curve = []
        for epoch in range(spec.epochs):
            metrics = trainer.step(epoch)
            curve.append({k: metrics.get(k) for k in CURVE_KEYS})
        trainer.save_pretrained(spec.output_dir)
        images, rewards = None, []
        if spec.eval_prompts:
            images, rewards = evaluate_rewards(trainer, trainer.reward_fn, spec.eval_prompts, spec.eval_seeds)
        judged = judged_fidelity(trainer, spec.prompts, spec.judge_images) if spec.judge_images else None
    finally:
        trainer.close()
    result = RunResult(spec, curve, rewards, images, time.time() - start, judged)
    return (initial, result) if before else result


def exit_with_parent(parent_pid: int, poll_seconds: float = 1.0) -> None:
    """Worker initializer: end this process once ``parent_pid`` is gone.

    A pool's workers are not the parent's threads: killed alone (``kill PID``), the parent leaves
    them training for minutes, competing for the CPU with whatever runs next."""
    def watch():
        while os.getppid() == parent_pid:
            time.sleep(poll_seconds)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="exit-with-parent").start()


def run_all(specs: list[RunSpec], jobs: int = 1, log=print) -> list[RunResult]:
    """Every spec's result, in order; ``jobs > 1`` runs them in that many spawned worker processes."""
    for spec in specs:
        Path(spec.output_dir).mkdir(parents=True, exist_ok=True)
    if jobs <= 1:
        results = []
        for spec in specs:
            results.append(train_run(spec))
            log(_describe(results[-1]))
        return results
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"), initializer=exit_with_parent,
                             initargs=(os.getpid(),)) as pool:
        futures = [pool.submit(train_run, spec) for spec in specs]
        results = []
        for future in futures:
            results.append(future.result())
            log(_describe(results[-1]))
    return results


def _describe(result: RunResult) -> str:
    rewards = result.rewards
    judged = ""
    if result.fidelity:
        f = result.fidelity
        judged = (f"; judged: background {f['background']:.0%}, objects {f['objects']:.0%} (absent {f['absent']:.0%}), "
                  f"dark {f['dark']:.0%}")
    return (f"[{result.spec.name}] reward {rewards[0]:.4f} -> {rewards[-1]:.4f} over {result.queries[-1]} queries, "
            f"{result.seconds:.0f} s{judged}")
