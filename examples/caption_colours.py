"""A per-pixel reward that the prompt does not contradict: draw only the colours the caption names.

    python python/experiment_sample_efficiency.py --captions default-run --reward examples/caption_colours.py:caption_colours
    python python/train.py --reward examples/caption_colours.py:caption_colours

For the embedded model's scene captions ("a red circle and a yellow star on a white background"):
every pixel whose nearest palette colour is one the caption names (background or object) scores +1,
every pixel of a palette colour the caption does not name scores -1, and pixels near no palette
colour (blurred edges, smudges) get no feedback (weight 0). Unlike "less blue", no image scores
better than one that shows exactly what its caption asks; a black image scores -1 unless the
caption names black. What it does not reward: shapes, or an object being there at all (an erased
object becomes background, which also scores +1), so judge the results (`pxpo_ext.judge`), as the
sample-efficiency program does.

Measured on the embedded model (2-core CPU, 2026-11-27; the first command with `--lrs 5e-3 --seeds 0
--epochs 40 --accumulation 2 --timestep-fraction 1.0`): it already scores 0.98, so there is nothing
left to learn, and both methods made it worse: the last epoch's reward was 0.93 (PXPO) and 0.56
(DDPO) against 0.96 in the first, and named objects drawn as asked fell from 81% to 16% and 3%. Advantages normalised
per prompt turn the small differences of a saturated reward into full-size updates; with
`--set advantage_std_floor=0.5` (same seed and settings) PXPO reached 0.998 by erasing objects
(9% left) and DDPO fell to 0.33. Use it on a model that draws its captions' colours less well,
or with a smaller learning rate.
"""
import torch

from pxpo_ext.judge import LABELS, segment_colours
from pxpo_ext.rewards import RewardOutput, check_images
from pxpo_ext.scenes import parse_caption


def caption_colours(images, prompts, metadata) -> RewardOutput:
    check_images(images, "caption_colours")
    rewards, weights = [], []
    for image, prompt in zip(images.float().cpu(), prompts):
        scene = parse_caption(prompt)
        named = [LABELS[c] for c in scene["background"]] + [LABELS[c] for c, _ in scene["objects"]]
        labels = torch.from_numpy(segment_colours(image))
        rewards.append(torch.where(torch.isin(labels, torch.tensor(named)), 1.0, -1.0))
        weights.append((labels >= 0).float())
    return RewardOutput(reward=torch.stack(rewards), weight=torch.stack(weights))
