"""Colour and scalar rewards, the registry, and bad inputs for every registered reward."""
import numpy as np
import pytest
import torch
from PIL import Image

from pxpo_ext.rewards import (
    ColourReward,
    RewardError,
    available_rewards,
    get_reward,
    normalize_output,
    scalar_reward,
)
from pxpo_ext.rewards.colour import srgb_to_lab
from pxpo_ext.rewards.scalar import jpeg_size_kb

BUILT_IN = {"colour", "segmentation", "remove_circles", "scene_alignment", "human", "jpeg_compressibility",
            "jpeg_incompressibility", "scalar"}
# A scene caption (scene_alignment scores only those); every other reward ignores the prompt.
PROMPT = "a red circle on a white background"


def mean_brightness(images, prompts, metadata):
    """A user scalar reward (imported by path in a test below)."""
    return images.mean(dim=(1, 2, 3))


def solid(rgb, batch=1, size=8) -> torch.Tensor:
    return torch.tensor(rgb, dtype=torch.float32).view(1, 3, 1, 1).expand(batch, 3, size, size).clone()


def test_importing_the_package_registers_every_built_in_reward():
    assert BUILT_IN <= set(available_rewards())


# ------------------------------------------------------------------ colour
def test_default_colour_reward_is_minus_blue_per_pixel():
    images = torch.rand(2, 3, 6, 5)
    reward = get_reward("colour")(images, ["a"] * 2, [{}] * 2)
    assert reward.shape == (2, 6, 5) and reward.dtype == torch.float32
    torch.testing.assert_close(reward, -images[:, 2])
    assert reward.max() <= 0 and reward.min() >= -1
    out = normalize_output(reward, "colour", 2, (6, 5))
    assert out.weight is None


def test_relative_reduction_scores_grey_zero_and_pure_blue_minus_one():
    reward = ColourReward(relative=True)
    assert reward(solid((0.5, 0.5, 0.5))).abs().max() < 1e-6
    torch.testing.assert_close(reward(solid((0.0, 0.0, 1.0))), torch.full((1, 8, 8), -1.0))
    torch.testing.assert_close(reward(solid((1.0, 1.0, 0.0))), torch.full((1, 8, 8), 1.0))


def test_reduce_other_channel_and_scale():
    images = torch.rand(1, 3, 4, 4)
    torch.testing.assert_close(ColourReward(channel="red", scale=2.0)(images), -2.0 * images[:, 0])


@pytest.mark.parametrize("target", [(1.0, 0.0, 0.0), "red", "#ff0000"])
def test_target_rgb_toward_and_away(target):
    toward = ColourReward(mode="target", target=target)
    away = ColourReward(mode="target", target=target, direction="away")
    images = torch.cat([solid((1.0, 0.0, 0.0)), solid((0.0, 1.0, 1.0))])
    r = toward(images)
    assert r[0].abs().max() < 1e-6  # on target
    torch.testing.assert_close(r[1], torch.full((8, 8), -1.0))  # the opposite corner of the RGB cube
    torch.testing.assert_close(away(images), -r)


def test_lab_conversion_matches_published_values():
    # CIELAB (D65) of sRGB white, red and mid grey (e.g. Bruce Lindbloom's calculator).
    rgb = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0], [0.5, 0.5, 0.5]]).view(3, 3, 1, 1)
    lab = srgb_to_lab(rgb).view(3, 3)
    expected = torch.tensor([[100.0, 0.0, 0.0], [53.24, 80.09, 67.20], [53.39, 0.0, 0.0]])
    torch.testing.assert_close(lab, expected, atol=0.02, rtol=0)


def test_target_lab_is_zero_on_target_and_negative_elsewhere():
    reward = ColourReward(mode="target", target="white", space="lab")
    r = reward(torch.cat([solid((1.0, 1.0, 1.0)), solid((0.0, 0.0, 0.0))]))
    assert r[0].abs().max() < 1e-4
    torch.testing.assert_close(r[1], torch.full((8, 8), -1.0), atol=1e-4, rtol=0)  # L*: 100 -> 0


@pytest.mark.parametrize(
    "options, message",
    [
        ({"mode": "brighter"}, "mode must be 'reduce' or 'target'"),
        ({"channel": "purple"}, "channel must be red, green or blue"),
        ({"scale": 0}, "scale must be a positive finite number"),
        ({"scale": float("nan")}, "scale must be a positive finite number"),
        ({"target": "red"}, "a target colour needs mode='target'"),
        ({"mode": "target"}, "needs target="),
        ({"mode": "target", "target": "chartreuse"}, "is not a colour name"),
        ({"mode": "target", "target": (1.0, 2.0, 0.0)}, "three RGB numbers in [0, 1]"),
        ({"mode": "target", "target": "red", "space": "hsv"}, "space must be 'rgb' or 'lab'"),
        ({"mode": "target", "target": "red", "direction": "up"}, "direction must be 'toward' or 'away'"),
    ],
)
def test_colour_options_are_checked(options, message):
    with pytest.raises(ValueError, match="'colour'") as error:
        get_reward("colour", **options)
    assert message in str(error.value)


# ------------------------------------------------------------------ scalar rewards
def test_jpeg_rewards_prefer_flat_or_busy_images():
    flat = solid((0.2, 0.4, 0.6), size=64)
    busy = torch.rand(1, 3, 64, 64)
    images = torch.cat([flat, busy])
    sizes = jpeg_size_kb(images)
    assert sizes[0] < sizes[1]
    compressible = get_reward("jpeg_compressibility")(images, ["x", "y"], [{}, {}])
    incompressible = get_reward("jpeg_incompressibility")(images, ["x", "y"], [{}, {}])
    assert compressible.shape == (2,) and compressible[0] > compressible[1]
    torch.testing.assert_close(incompressible, -compressible)
    torch.testing.assert_close(incompressible, sizes)
    normalize_output(compressible, "jpeg_compressibility", 2, (64, 64))


def test_jpeg_size_is_the_quality_95_file_size_in_kilobytes(tmp_path):
    image = torch.rand(1, 3, 32, 32)
    pixels = (image[0] * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    Image.fromarray(pixels).save(tmp_path / "x.jpg", format="JPEG", quality=95)
    assert jpeg_size_kb(image).item() == pytest.approx((tmp_path / "x.jpg").stat().st_size / 1000)


def test_jpeg_quality_is_checked():
    with pytest.raises(ValueError, match="JPEG quality"):
        get_reward("jpeg_compressibility", quality=0)


@pytest.mark.parametrize("convert", [list, np.asarray, torch.as_tensor, lambda v: torch.as_tensor(v).view(-1, 1)])
def test_scalar_reward_accepts_one_number_per_image(convert):
    reward = scalar_reward(lambda images, prompts, metadata: convert([float(len(p)) for p in prompts]), name="len")
    out = reward(torch.rand(3, 3, 4, 4), ["a", "bb", "ccc"], [{}] * 3)
    torch.testing.assert_close(out, torch.tensor([1.0, 2.0, 3.0]))
    normalize_output(out, reward.name, 3, (4, 4))


@pytest.mark.parametrize(
    "returned, message",
    [
        ([1.0, 2.0], "shape (2,); expected (3,)"),
        (torch.zeros(3, 4, 4), "shape (3, 4, 4)"),
        ([1.0, float("nan"), 0.0], "NaN or infinite"),
        ([1.0, float("inf"), 0.0], "NaN or infinite"),
        (["a", "b", "c"], "not numbers"),
        (None, "returned None"),
    ],
)
def test_scalar_reward_refuses_bad_values_naming_the_function(returned, message):
    def my_score(images, prompts, metadata):
        return returned

    with pytest.raises(RewardError, match="'my_score'") as error:
        scalar_reward(my_score)(torch.rand(3, 3, 4, 4), ["x"] * 3, [{}] * 3)
    assert message in str(error.value)


def test_scalar_reward_by_import_path():
    reward = get_reward("scalar", function="test_rewards:mean_brightness")
    images = torch.rand(2, 3, 4, 4)
    torch.testing.assert_close(reward(images, ["a", "b"], [{}, {}]), images.mean(dim=(1, 2, 3)))
    assert reward.name == "test_rewards:mean_brightness"


@pytest.mark.parametrize(
    "function, message",
    [
        (None, "needs function="),
        ("mean_brightness", "must look like 'package.module:name' or 'path/to/file.py:name'"),
        ("no_such_module_xyz:f", "cannot import module"),
        ("test_rewards:no_such_function", "has no attribute"),
    ],
)
def test_scalar_import_path_errors(function, message):
    with pytest.raises(ValueError, match=message):
        get_reward("scalar", function=function)


# ------------------------------------------------------------------ bad inputs, every reward
@pytest.fixture(scope="module")
def every_reward(tmp_path_factory):
    """One instance of every registered reward, built with the options it needs."""
    from transformers import SegformerConfig, SegformerForSemanticSegmentation

    folder = tmp_path_factory.mktemp("rewards")
    torch.manual_seed(0)
    config = SegformerConfig(num_encoder_blocks=1, depths=[1], sr_ratios=[1], hidden_sizes=[8], patch_sizes=[3],
                             strides=[4], num_attention_heads=[1], mlp_ratios=[1], decoder_hidden_size=8,
                             num_labels=2, id2label={0: "background", 1: "hair"}, label2id={"background": 0, "hair": 1})
    SegformerForSemanticSegmentation(config).save_pretrained(folder / "segformer")
    like = np.zeros((16, 16), np.uint8)
    like[:8] = 255
    Image.fromarray(like).save(folder / "like.png")
    Image.fromarray(255 - like).save(folder / "dislike.png")
    options = {
        "segmentation": {"model": str(folder / "segformer"), "classes": ["hair"]},
        "human": {"like_mask": str(folder / "like.png"), "dislike_mask": str(folder / "dislike.png")},
        "scalar": {"function": "test_rewards:mean_brightness"},
    }
    return {name: get_reward(name, **options.get(name, {})) for name in sorted(BUILT_IN)}


def test_every_reward_accepts_good_images(every_reward):
    images = torch.rand(2, 3, 16, 16)
    for name, reward in every_reward.items():
        out = normalize_output(reward(images, [PROMPT] * 2, [{}, {}]), name, 2, (16, 16))
        assert torch.isfinite(out.reward).all(), name


BAD_IMAGES = {
    "wrong channels": (lambda: torch.rand(2, 4, 16, 16), "shape (B, 3, H, W)"),
    "no batch axis": (lambda: torch.rand(3, 16, 16), "shape (B, 3, H, W)"),
    "NaN": (lambda: torch.rand(2, 3, 16, 16).index_put_((torch.tensor([0]),), torch.tensor(float("nan"))), "NaN"),
    "infinity": (lambda: torch.full((2, 3, 16, 16), float("inf")), "NaN or infinite"),
    "above one": (lambda: torch.rand(2, 3, 16, 16) * 255, "in [0, 1]"),
    "below zero": (lambda: torch.rand(2, 3, 16, 16) * 2 - 1, "in [0, 1]"),
    "uint8": (lambda: (torch.rand(2, 3, 16, 16) * 255).to(torch.uint8), "float images"),
    "numpy": (lambda: np.random.rand(2, 3, 16, 16), "torch tensor"),
    "empty": (lambda: torch.rand(0, 3, 16, 16), "empty batch"),
}


@pytest.mark.parametrize("case", sorted(BAD_IMAGES))
def test_every_reward_refuses_bad_images_naming_itself(every_reward, case):
    make, message = BAD_IMAGES[case]
    for name, reward in every_reward.items():
        with pytest.raises(RewardError) as error:
            reward(make(), [PROMPT] * 2, [{}, {}])
        assert repr(reward.name) in str(error.value), (name, str(error.value))
        assert message in str(error.value), (name, str(error.value))
