"""Reward curves over seeds: their mean and spread, choosing a learning rate, and sample efficiency.

A curve is the mean reward of each epoch's on-policy samples against the reward queries spent so
far (queries = images rewarded). The samples of epoch ``e`` come from the weights after ``e``
updates, so the first point is the initial model's reward.
"""
from __future__ import annotations

import math

import numpy as np


def stack_curves(queries: list[list[int]], rewards: list[list[float]]) -> tuple[np.ndarray, np.ndarray]:
    """``(queries (E,), rewards (S, E))`` for S runs that share one query schedule (refused otherwise)."""
    if not queries:
        raise ValueError("no runs to stack")
    first = list(queries[0])
    for q in queries[1:]:
        if list(q) != first:
            raise ValueError(f"runs spent their queries on different schedules ({first} vs {list(q)}); "
                             "compare runs with the same samples per epoch and number of epochs")
    return np.asarray(first, dtype=np.float64), np.asarray(rewards, dtype=np.float64)


def summarise(rewards: np.ndarray) -> dict[str, np.ndarray]:
    """Per epoch over seeds: mean, sample standard deviation (0 for one seed), min and max."""
    std = rewards.std(axis=0, ddof=1) if rewards.shape[0] > 1 else np.zeros(rewards.shape[1])
    return {"mean": rewards.mean(axis=0), "std": std, "min": rewards.min(axis=0), "max": rewards.max(axis=0)}


def final_reward(rewards, last: int = 2) -> float:
    """The mean of the last ``last`` epochs of a curve (one epoch of 16 samples alone is noisy)."""
    values = np.asarray(rewards, dtype=np.float64)
    return float(values[..., -last:].mean())


def queries_to_reach(queries, curve, target: float) -> float:
    """Queries at which ``curve`` first reaches ``target`` (higher is better), linearly interpolated
    between epochs; ``nan`` if it never does."""
    q = np.asarray(queries, dtype=np.float64)
    c = np.asarray(curve, dtype=np.float64)
    above = np.nonzero(c >= target)[0]
    if not len(above):
        return math.nan
    k = int(above[0])
    if k == 0:
        return float(q[0])
    frac = (target - c[k - 1]) / (c[k] - c[k - 1])
    return float(q[k - 1] + frac * (q[k] - q[k - 1]))


def smooth(curve, window: int = 2) -> np.ndarray:
    """Trailing mean over ``window`` epochs (the first points average what exists so far)."""
    c = np.asarray(curve, dtype=np.float64)
    return np.array([c[max(0, i - window + 1):i + 1].mean() for i in range(len(c))])


def best_setting(scores: dict) -> object:
    """The key with the highest score (a final reward), ties going to the first listed."""
    if not scores:
        raise ValueError("no settings to choose from")
    return max(scores, key=lambda k: (scores[k], -list(scores).index(k)))


def paired_difference(a, b, resamples: int = 10_000, seed: int = 0) -> dict[str, float]:
    """``a - b`` over paired seeds (same index, same seed): the mean difference, a 95% percentile bootstrap
    interval of that mean over seeds (resampled with a fixed generator, so it is reproducible), and in how
    many seeds ``a`` is higher, lower or equal. With few seeds the interval is rough; it says whether the
    seed spread alone could explain the difference."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or not len(a):
        raise ValueError(f"paired_difference needs two equal-length lists of per-seed values, got {a.shape} and {b.shape}")
    diff = a - b
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, len(diff), size=(resamples, len(diff)))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return {"mean": float(diff.mean()), "ci_low": float(low), "ci_high": float(high), "seeds": len(diff),
            "a_higher": int((diff > 0).sum()), "a_lower": int((diff < 0).sum()), "equal": int((diff == 0).sum())}


def mean_after_start(rewards) -> np.ndarray:
    """Each run's mean reward over its epochs after the first (the area under its learning curve, per
    epoch): the first epoch samples the initial model, the same for every method at one seed."""
    values = np.asarray(rewards, dtype=np.float64)
    return values[..., 1:].mean(axis=-1)
