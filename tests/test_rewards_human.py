"""A person's marks: masks -> reward and weight maps, PNG routes, and the reward function."""
import io

import numpy as np
import pytest
import torch
from PIL import Image

from pxpo_ext.ops import reward_to_latent
from pxpo_ext.rewards import (
    HumanFeedbackReward,
    RewardError,
    get_reward,
    marks_to_maps,
    normalize_output,
)
from pxpo_ext.rewards.human import (
    feedback_from_masks,
    marks_from_canvas_png,
    mask_from_png,
)


def halves(size=8):
    liked = torch.zeros(size, size)
    liked[: size // 2] = 1.0
    disliked = torch.zeros(size, size)
    disliked[size // 2 :, : size // 2] = 1.0
    return liked, disliked


def png_bytes(array: np.ndarray, mode=None) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array, mode=mode).save(buffer, format="PNG")
    return buffer.getvalue()


def test_marks_become_plus_minus_one_rewards_and_painted_weights():
    liked, disliked = halves()
    reward, weight = marks_to_maps(liked, disliked)
    assert (reward[:4] == 1).all() and (reward[4:, :4] == -1).all() and (reward[4:, 4:] == 0).all()
    assert (weight[:4] == 1).all() and (weight[4:, :4] == 1).all() and (weight[4:, 4:] == 0).all()


def test_overlapping_marks_cancel_and_soft_marks_give_fractions():
    liked = torch.tensor([[1.0, 0.5, 0.0]])
    disliked = torch.tensor([[1.0, 0.0, 0.25]])
    reward, weight = marks_to_maps(liked, disliked)
    torch.testing.assert_close(reward, torch.tensor([[0.0, 0.5, -0.25]]))
    torch.testing.assert_close(weight, torch.tensor([[1.0, 0.5, 0.25]]))


@pytest.mark.parametrize(
    "liked, disliked, message",
    [
        (None, None, "needs a liked mask"),
        (torch.zeros(4, 4), torch.zeros(4, 5), "must be (H, W) of one size"),
        (torch.zeros(1, 4, 4), None, "must be (H, W)"),
        (torch.full((4, 4), 2.0), None, "finite values in [0, 1]"),
        (torch.full((4, 4), float("nan")), None, "finite values in [0, 1]"),
    ],
)
def test_bad_masks_are_refused(liked, disliked, message):
    with pytest.raises(ValueError) as error:
        marks_to_maps(liked, disliked)
    assert message in str(error.value)


def test_reward_function_repeats_the_maps_and_unpainted_pixels_get_no_weight():
    reward_fn = HumanFeedbackReward(*marks_to_maps(*halves(16)))
    out = normalize_output(reward_fn(torch.rand(3, 3, 16, 16), ["p"] * 3, [{"seed": 1}] * 3), "human", 3, (16, 16))
    assert out.reward.shape == (3, 16, 16) and out.weight.shape == (3, 16, 16)
    assert out.info == {"liked_fraction": 0.5, "disliked_fraction": 0.25}
    # At latent resolution (8x smaller) the unpainted quarter has weight 0, the rest weight 1.
    r_lat, w_lat = reward_to_latent(out.reward, 2, out.weight)
    torch.testing.assert_close(w_lat[0], torch.tensor([[1.0, 1.0], [1.0, 0.0]]))
    torch.testing.assert_close(r_lat[0], torch.tensor([[1.0, 1.0], [-1.0, 0.0]]))


def test_reward_function_errors_name_it():
    reward_fn = HumanFeedbackReward(*marks_to_maps(*halves(16)))
    with pytest.raises(RewardError, match="'human'.*marks are 16x16 but the images are 32x32"):
        reward_fn(torch.rand(1, 3, 32, 32))
    with pytest.raises(RewardError, match="'human'.*in \\[0, 1\\]"):
        reward_fn(torch.rand(1, 3, 16, 16) + 1)
    with pytest.raises(RewardError, match="'human' has no marks yet"):
        HumanFeedbackReward()(torch.rand(1, 3, 16, 16))


@pytest.mark.parametrize("which", ["liked", "disliked", "none"])
def test_marks_of_one_kind_are_refused_because_they_carry_no_signal(which):
    liked, disliked = halves()
    masks = {"liked": (liked, None), "disliked": (None, disliked), "none": (torch.zeros(8, 8), None)}[which]
    expected = "nothing is painted" if which == "none" else f"only {which} regions are painted"
    with pytest.raises(ValueError, match=expected):
        HumanFeedbackReward(*marks_to_maps(*masks))


def test_png_masks_use_luminance_times_alpha(tmp_path):
    grey = np.array([[0, 128, 255]], dtype=np.uint8)
    (tmp_path / "l.png").write_bytes(png_bytes(grey))
    torch.testing.assert_close(mask_from_png(tmp_path / "l.png"), torch.tensor([[0.0, 128 / 255, 1.0]]))
    rgba = np.array([[[255, 255, 255, 255], [255, 255, 255, 0], [0, 0, 0, 255]]], dtype=np.uint8)
    torch.testing.assert_close(mask_from_png(png_bytes(rgba, "RGBA")), torch.tensor([[1.0, 0.0, 0.0]]))


def test_canvas_png_green_is_liked_red_is_disliked():
    rgba = np.array([[[0, 255, 0, 255], [255, 0, 0, 255], [0, 255, 0, 0], [0, 0, 0, 0]]], dtype=np.uint8)
    liked, disliked = marks_from_canvas_png(png_bytes(rgba, "RGBA"))
    torch.testing.assert_close(liked, torch.tensor([[1.0, 0.0, 0.0, 0.0]]))
    torch.testing.assert_close(disliked, torch.tensor([[0.0, 1.0, 0.0, 0.0]]))


def test_unreadable_and_oversized_pngs_are_refused(tmp_path):
    with pytest.raises(ValueError, match="not a readable image"):
        marks_from_canvas_png(b"not a png")
    big = Image.new("L", (5000, 5000))
    big.save(tmp_path / "big.png")
    with pytest.raises(ValueError, match="larger than"):
        mask_from_png(tmp_path / "big.png", "big mask")


def test_registered_human_reward_reads_png_files(tmp_path):
    liked, disliked = halves(16)
    (tmp_path / "like.png").write_bytes(png_bytes((liked.numpy() * 255).astype(np.uint8)))
    (tmp_path / "dislike.png").write_bytes(png_bytes((disliked.numpy() * 255).astype(np.uint8)))
    reward_fn = get_reward("human", like_mask=str(tmp_path / "like.png"), dislike_mask=str(tmp_path / "dislike.png"))
    torch.testing.assert_close(reward_fn.reward, liked - disliked)
    same = feedback_from_masks(tmp_path / "like.png", tmp_path / "dislike.png")
    torch.testing.assert_close(same.weight, reward_fn.weight)
    with pytest.raises(ValueError, match="needs like_mask= and/or dislike_mask="):
        get_reward("human")
    with pytest.raises(ValueError, match="not a readable image"):
        get_reward("human", like_mask=str(tmp_path / "missing.png"), dislike_mask=str(tmp_path / "dislike.png"))
