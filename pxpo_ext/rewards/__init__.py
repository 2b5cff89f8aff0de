"""Reward functions: per-pixel feedback sources (colour, segmentation, a person) and DDPO's scalars."""
from .base import RewardError, RewardOutput, available_rewards, get_reward, normalize_output, register_reward

__all__ = ["RewardError", "RewardOutput", "available_rewards", "get_reward", "normalize_output", "register_reward"]
