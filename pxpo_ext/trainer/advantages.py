"""Advantages from latent reward maps (SPEC §4): per-prompt stat tracking on maps, or batch-wide.

Rewards arrive as latent maps ``r`` (B, h, w) with weights ``w`` (B, h, w). A group is the set
of maps that share a prompt (its buffer of past maps plus the current ones) or, without
per-prompt tracking or while a prompt has fewer than ``min_count`` buffered maps, the whole
current batch. With ``baseline="group"`` (the default)

    A = clip((r - mu) / (sd + 1e-6), -A_max, A_max)

with ``mu``, ``sd`` the weighted mean and standard deviation over every pixel of the group;
``std_floor > 0`` divides by ``max(sd, std_floor)`` instead, so that a group whose rewards
barely differ (a saturated reward) gets small advantages rather than its noise scaled up to
full size.
With ``baseline="location"`` the mean is taken per latent pixel over the group, ``mu[i, j]``,
and ``sd`` is the weighted spread of ``r - mu[i, j]`` over the group (locations nobody gave
feedback on fall back to the group mean). An image's own spatial mean is never subtracted.

DDPO is the same computation on ``1 x 1`` maps: :func:`image_rewards` reduces each map to its
weighted mean, which makes ``mu`` and ``sd`` DDPO's per-image statistics.
"""
from __future__ import annotations

from collections import deque

import torch

EPS = 1e-6


def image_rewards(reward: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image weighted mean reward as ``(B, 1, 1)`` maps, and their weights (0 for an image without feedback)."""
    wsum = weight.sum(dim=(1, 2))
    mean = (weight * reward).sum(dim=(1, 2)) / wsum.clamp_min(torch.finfo(wsum.dtype).tiny)
    has = (wsum > 0).to(reward.dtype)
    return (mean * has).view(-1, 1, 1), has.view(-1, 1, 1)


def _normalise(reward, weight, group_reward, group_weight, baseline: str, std_floor: float) -> torch.Tensor:
    """Advantages of ``reward`` (N, h, w) against the group's maps (M, h, w); unclipped.

    Float64 statistics: rewards often differ by far less than their size, and a float32 variance
    over many pixels would lose those differences to cancellation.
    """
    reward, group_reward, group_weight = reward.double(), group_reward.double(), group_weight.double()
    total = group_weight.sum()
    if not total > 0:  # nobody gave feedback anywhere: nothing to learn from
        return torch.zeros_like(reward)
    mu = (group_weight * group_reward).sum() / total
    if baseline == "location":
        wsum = group_weight.sum(dim=0)
        local = (group_weight * group_reward).sum(dim=0) / wsum.clamp_min(torch.finfo(wsum.dtype).tiny)
        mu = torch.where(wsum > 0, local, mu)
    var = (group_weight * (group_reward - mu) ** 2).sum() / total
    return ((reward - mu) / (var.sqrt().clamp_min(std_floor) + EPS)).float()


class StatTracker:
    """Normalises latent reward maps into advantages; per-prompt buffers persist across epochs.

    ``state_dict()`` / ``load_state_dict()`` hold the buffers, so a resumed run normalises
    exactly as an uninterrupted one.
    """

    def __init__(self, per_prompt: bool = True, buffer_size: int = 16, min_count: int = 16,
                 baseline: str = "group", adv_clip_max: float = 5.0, std_floor: float = 0.0):
        if baseline not in ("group", "location"):
            raise ValueError(f"baseline must be 'group' or 'location', got {baseline!r}")
        if buffer_size < 1 or min_count < 0:
            raise ValueError(f"buffer_size must be >= 1 and min_count >= 0, got {buffer_size} and {min_count}")
        if not std_floor >= 0:
            raise ValueError(f"std_floor must be >= 0 (0: none), got {std_floor}")
        self.per_prompt = per_prompt
        self.buffer_size = buffer_size
        self.min_count = min_count
        self.baseline = baseline
        self.adv_clip_max = float(adv_clip_max)
        self.std_floor = float(std_floor)
        self.buffers: dict[str, deque] = {}

    def update(self, prompts: list[str], reward: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """Advantages (N, h, w) for ``reward`` and ``weight`` (N, h, w) of the samples of ``prompts``.

        Current maps join their prompt's buffer before the statistics are taken (as in DDPO).
        """
        if reward.shape != weight.shape or reward.dim() != 3 or reward.shape[0] != len(prompts):
            raise ValueError(f"need {len(prompts)} reward and weight maps (N, h, w) of one shape, got "
                             f"{tuple(reward.shape)} and {tuple(weight.shape)}")
        reward, weight = reward.detach().float().cpu(), weight.detach().float().cpu()
        advantages = torch.empty_like(reward)
        if not self.per_prompt:
            advantages[:] = _normalise(reward, weight, reward, weight, self.baseline, self.std_floor)
            return advantages.clamp(-self.adv_clip_max, self.adv_clip_max)
        for prompt in dict.fromkeys(prompts):  # unique, in first-seen order
            idx = torch.tensor([i for i, p in enumerate(prompts) if p == prompt])
            buf = self.buffers.setdefault(prompt, deque(maxlen=self.buffer_size))
            if buf and buf[0][0].shape != reward.shape[1:]:
                raise ValueError(f"prompt {prompt!r} has buffered maps of shape {tuple(buf[0][0].shape)} but got "
                                 f"{tuple(reward.shape[1:])}; the latent size must not change within a run")
            buf.extend(zip(reward[idx], weight[idx]))
            if len(buf) < self.min_count:
                group_r, group_w = reward, weight
            else:
                group_r = torch.stack([r for r, _ in buf])
                group_w = torch.stack([w for _, w in buf])
            advantages[idx] = _normalise(reward[idx], weight[idx], group_r, group_w, self.baseline, self.std_floor)
        return advantages.clamp(-self.adv_clip_max, self.adv_clip_max)

    def stats(self) -> dict:
        counts = [len(b) for b in self.buffers.values()]
        return {"prompts_tracked": len(counts), "mean_buffer": sum(counts) / len(counts) if counts else 0.0}

    def state_dict(self) -> dict:
        return {
            "prompts": list(self.buffers),
            "rewards": [torch.stack([r for r, _ in b]) for b in self.buffers.values()],
            "weights": [torch.stack([w for _, w in b]) for b in self.buffers.values()],
        }

    def load_state_dict(self, state: dict) -> None:
        self.buffers = {}
        for prompt, rewards, weights in zip(state["prompts"], state["rewards"], state["weights"]):
            self.buffers[prompt] = deque(zip(rewards, weights), maxlen=self.buffer_size)
