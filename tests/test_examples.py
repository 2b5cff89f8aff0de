"""The files in examples/ do what their docstrings say, through the same import paths a user types."""
from pathlib import Path

import torch

from pxpo_ext import cli
from pxpo_ext.rewards import RewardOutput, get_reward
from pxpo_ext.scenes import COLOURS
from pxpo_ext.trainer.prompts import get_prompt_fn

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "custom_feedback.py"
CAPTION_COLOURS = Path(__file__).resolve().parents[1] / "examples" / "caption_colours.py"


def test_the_example_prompts_carry_their_background_and_cycle():
    prompts = get_prompt_fn(f"cycle:4:{EXAMPLE}:ObjectPrompts", seed=0)
    drawn = [prompts() for _ in range(8)]
    assert drawn[:4] == drawn[4:]
    for prompt, metadata in drawn:
        assert prompt.endswith(f"on a {metadata['background']} background")


def test_the_example_prompts_resume_their_stream(tmp_path):
    prompts = get_prompt_fn(f"{EXAMPLE}:ObjectPrompts", seed=3)
    prompts()
    torch.save(prompts.state_dict(), tmp_path / "state.pt")  # as a checkpoint stores it
    expected = [prompts() for _ in range(3)]
    again = get_prompt_fn(f"{EXAMPLE}:ObjectPrompts", seed=99)
    again.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    assert [again() for _ in range(3)] == expected


def test_the_example_reward_marks_the_object_and_leaves_the_background_unmarked():
    reward = get_reward(f"{EXAMPLE}:object_colour", target="yellow")
    image = (torch.tensor(COLOURS["blue"], dtype=torch.float32) / 255).view(1, 3, 1, 1).repeat(2, 1, 8, 8)
    image[0, :, 2:4, 2:4] = torch.tensor(COLOURS["yellow"]).view(3, 1, 1) / 255  # a yellow object
    image[1, :, 2:4, 2:4] = torch.tensor(COLOURS["red"]).view(3, 1, 1) / 255     # a red one
    out = reward(image, ["a yellow square on a blue background"] * 2, [{"background": "blue"}] * 2)
    assert isinstance(out, RewardOutput)
    assert out.weight.sum(dim=(1, 2)).tolist() == [4.0, 4.0]  # only the object's pixels have feedback
    on_object = out.reward[:, 2:4, 2:4].mean(dim=(1, 2))
    assert on_object[0] == 0 and on_object[1] < -0.3  # the yellow object already is the target


def test_caption_colours_scores_named_colours_up_and_others_down():
    from pxpo_ext.scenes import SceneGenerator

    reward = get_reward(f"{CAPTION_COLOURS}:caption_colours")
    scene = next(sc for sc in (SceneGenerator(image_size=32, seed=3).sample(i) for i in range(50))
                 if len(sc.background) == 1 and "black" not in sc.caption)
    drawn = torch.as_tensor(scene.image).float().unsqueeze(0)
    black = torch.zeros_like(drawn)
    out = reward(torch.cat([drawn, black]), [scene.caption] * 2, [{}] * 2)
    assert isinstance(out, RewardOutput) and out.reward.shape == (2, 32, 32)
    labelled = out.weight[0] > 0
    # The generator's own image: every labelled pixel is a colour the caption names.
    assert labelled.float().mean() > 0.9 and (out.reward[0][labelled] == 1).all()
    assert (out.reward[1] == -1).all() and (out.weight[1] == 1).all()  # black, which the caption does not name


def test_train_py_runs_the_example_as_its_docstring_says(tiny_model, tmp_path):
    trainer = cli.train_main([
        "--model", tiny_model, "--output-dir", str(tmp_path / "run"), "--num-epochs", "1", "--sample-num-steps", "2",
        "--sample-batch-size", "2", "--sample-num-batches-per-epoch", "1", "--train-batch-size", "2",
        "--train-gradient-accumulation-steps", "1", "--num-eval-images", "2", "--save-freq", "0",
        "--reward-workers", "1", "--no-use-tensorboard",
        "--prompts", f"cycle:2:{EXAMPLE}:ObjectPrompts", "--reward", f"{EXAMPLE}:object_colour",
        "--reward-kwargs", "target=yellow",
    ])
    assert trainer.epoch == 1 and trainer.global_step == 1
    # The before/after grids are scored with the prompts' own metadata, which this reward needs.
    assert [m["background"] for m in trainer.eval_metadata] == [
        p.split(" on a ")[1].removesuffix(" background") for p in trainer.eval_prompts]
    assert (tmp_path / "run" / "samples_after.png").is_file()
