"""The scene-alignment reward: per-pixel feedback on the generator's own scenes and on broken copies."""
import numpy as np
import pytest
import torch

from pxpo_ext.rewards import RewardError, get_reward
from pxpo_ext.rewards.scene import generator_object_area
from pxpo_ext.scenes import COLOURS, SHAPES, SceneGenerator, shape_mask


@pytest.fixture(scope="module")
def scenes():
    return SceneGenerator(seed=3).generate(8)


def paint(image: torch.Tensor, mask: torch.Tensor, colour: str) -> torch.Tensor:
    out = image.clone()
    out[:, mask] = torch.tensor(COLOURS[colour], dtype=torch.float32).view(3, 1) / 255.0
    return out


def test_a_drawn_caption_scores_each_object_up_to_the_nominal_area_and_nothing_elsewhere(scenes):
    out = get_reward("scene_alignment")(scenes.images, scenes.captions, [{}] * len(scenes.captions))
    nominal = generator_object_area() * 64 * 64
    assert torch.equal(out.weight, torch.ones_like(out.weight))  # the generator draws palette colours only
    for reward, scene in zip(out.reward, scenes.scenes):
        objects = torch.zeros(64, 64, dtype=torch.bool)
        for obj in scene.objects:
            area = float(obj["mask"].sum())
            assert torch.allclose(reward[obj["mask"]], torch.tensor(min(1.0, nominal / area)))
            objects |= obj["mask"]
        assert (reward[~objects] == 0).all()  # the named background
        assert float(reward.sum()) == pytest.approx(sum(min(float(o["mask"].sum()), nominal) for o in scene.objects),
                                                    rel=1e-5)


def test_a_stray_colour_and_a_misshapen_object_are_marked_where_they_are_drawn(scenes):
    scene = scenes.scenes[0]
    obj = scene.objects[0]
    unnamed = next(c for c in COLOURS if c not in scene.caption)
    recoloured = paint(scene.image, obj["mask"], unnamed)
    # The same object in another shape, same place and size (its old pixels become background).
    other = next(s for s in SHAPES if s != obj["shape"])
    x0, y0, x1, y1 = obj["bbox"]
    moved = shape_mask(other, (x0 + x1) / 2, (y0 + y1) / 2, obj["size"] * 64, 64, 64)
    misshapen = paint(paint(scene.image, obj["mask"], scene.background[0]), torch.from_numpy(moved), obj["colour"])
    reward = get_reward("scene_alignment")
    out = reward(torch.stack([scene.image, recoloured, misshapen]), [scene.caption] * 3, [{}] * 3).reward
    assert (out[0][obj["mask"]] > 0).all()
    assert (out[1][obj["mask"]] == -1).all()
    assert (out[2][torch.from_numpy(moved)] == -1).all()
    assert out[1].sum() < out[0].sum() and out[2].sum() < out[0].sum()


def test_pixels_near_no_palette_colour_get_no_feedback(scenes):
    image = scenes.images[0].clone()
    image[:, :4, :4] = torch.tensor([0.5, 0.25, 0.9]).view(3, 1, 1)  # far from every palette colour
    out = get_reward("scene_alignment")(image[None], [scenes.captions[0]], [{}])
    assert (out.weight[0, :4, :4] == 0).all() and (out.weight[0, 4:] == 1).all()


def test_an_erased_object_loses_its_reward_and_nothing_beats_the_drawn_caption(scenes):
    scene = scenes.scenes[1]
    erased = paint(scene.image, scene.objects[0]["mask"], scene.background[0])
    black = torch.zeros_like(scene.image)
    out = get_reward("scene_alignment")(torch.stack([scene.image, erased, black]), [scene.caption] * 3, [{}] * 3)
    means = out.reward.mean(dim=(1, 2))
    assert means[0] > means[1] and means[0] > means[2]


def test_object_area_option_and_errors(scenes):
    small = get_reward("scene_alignment", object_area=0.01)(scenes.images[:1], scenes.captions[:1], [{}]).reward
    assert float(small.max()) < 1.0 and np.isclose(float(small.sum()), 0.01 * 64 * 64 * len(scenes.scenes[0].objects))
    with pytest.raises(RewardError, match="object_area=0.*fraction"):
        get_reward("scene_alignment", object_area=0.0)
    with pytest.raises(RewardError, match="'scene_alignment' scores only scene captions.*scene grammar"):
        get_reward("scene_alignment")(scenes.images[:1], ["a photo of a cat"], [{}])
    with pytest.raises(RewardError, match="1 images but 2 prompts"):
        get_reward("scene_alignment")(scenes.images[:1], scenes.captions[:2], [{}])
