"""Your own per-pixel feedback and prompts, in one file, named on the command line (no package needed):

    python python/train.py --prompts cycle:16:examples/custom_feedback.py:ObjectPrompts \
        --reward examples/custom_feedback.py:object_colour --reward-kwargs target=yellow

Each prompt names one object and a plain background, and says which background in its metadata. The
reward scores every pixel by how close it is to a target colour, and gives no feedback at all (weight 0)
where the image shows the background the prompt asked for: PXPO scales each latent pixel's gradient by its
own reward, so the feedback is about the object alone, which one scalar per image (DDPO) cannot say.

How pxpo uses the two names (docs/rewards.md): ``ObjectPrompts`` takes ``seed``, so it is a factory called
with the run's seed (one per process) that returns the prompt function; ``object_colour`` takes the
``--reward-kwargs``, so it is a factory called with them that returns the reward function.
"""
import random

import torch

from pxpo_ext.rewards import RewardOutput, check_images
from pxpo_ext.scenes import COLOURS, SHAPES  # the embedded model's vocabulary


class ObjectPrompts:
    """``prompt_fn() -> (prompt, metadata)``: one object of one colour on a plain background of another."""

    def __init__(self, seed: int):
        self.rng = random.Random(seed)

    def __call__(self) -> tuple[str, dict]:
        colour, background = self.rng.sample(sorted(COLOURS), 2)
        return f"a {colour} {self.rng.choice(SHAPES)} on a {background} background", {"background": background}

    # Optional: with these two, --resume-from continues the prompt stream exactly (checkpoints store the state).
    def state_dict(self) -> dict:
        return {"rng": self.rng.getstate()}

    def load_state_dict(self, state: dict) -> None:
        version, internal, gauss = state["rng"]
        self.rng.setstate((version, tuple(internal), gauss))  # a checkpoint gives the tuple back as a list


def object_colour(target: str = "yellow", tolerance: float = 0.3):
    """Reward ``-distance(pixel, target) / sqrt(3)`` in ``[-1, 0]`` on every pixel that is not the prompt's
    background (within ``tolerance`` in RGB), and no feedback on the background."""
    if target not in COLOURS:
        raise ValueError(f"target must be one of {sorted(COLOURS)}, got {target!r}")
    goal = torch.tensor(COLOURS[target], dtype=torch.float32) / 255

    def reward(images, prompts, metadata) -> RewardOutput:
        check_images(images, "object_colour")  # a clear error for images outside [0, 1] and the like
        images = images.float()
        background = torch.tensor([COLOURS[m["background"]] for m in metadata], dtype=torch.float32) / 255
        off_background = (images - background.to(images.device)[:, :, None, None]).norm(dim=1) > tolerance
        closeness = -(images - goal.to(images.device)[None, :, None, None]).norm(dim=1) / 3**0.5
        return RewardOutput(reward=closeness.cpu(), weight=off_background.float().cpu())

    return reward
