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


def broken_copies(scene):
    """The scene's image with its first object recoloured (to a colour the caption does not name),
    drawn in another shape at the same place and size, and erased; and that object's mask in each."""
    obj = scene.objects[0]
    unnamed = next(c for c in COLOURS if c not in scene.caption)
    other = next(s for s in SHAPES if s != obj["shape"])
    x0, y0, x1, y1 = obj["bbox"]
    moved = torch.from_numpy(shape_mask(other, (x0 + x1) / 2, (y0 + y1) / 2, obj["size"] * 64, 64, 64))
    erased = paint(scene.image, obj["mask"], scene.background[0])
    return torch.stack([paint(scene.image, obj["mask"], unnamed), paint(erased, moved, obj["colour"]), erased]), \
        [obj["mask"], moved, obj["mask"]]


def test_a_stray_colour_and_a_misshapen_object_are_marked_where_they_are_drawn(scenes):
    scene = scenes.scenes[0]
    images, masks = broken_copies(scene)
    reward = get_reward("scene_alignment")
    out = reward(torch.cat([scene.image[None], images]), [scene.caption] * 4, [{}] * 4).reward
    assert (out[0][masks[0]] > 0).all()
    assert (out[1][masks[0]] == -1).all()  # an unnamed colour
    assert (out[2][masks[1]] < 0).all()  # the named colour in another shape
    assert (out[2][~masks[1]] >= 0).all()  # it covers more than the nominal area: nothing left for the background


def test_a_missing_object_costs_the_nominal_area_whether_misshapen_or_erased(scenes):
    nominal = generator_object_area() * 64 * 64
    for scene in scenes.scenes:
        images, masks = broken_copies(scene)
        out = get_reward("scene_alignment")(torch.cat([scene.image[None], images]), [scene.caption] * 4, [{}] * 4)
        totals = out.reward.sum(dim=(1, 2))
        gain = min(float(scene.objects[0]["mask"].sum()), nominal)
        # drawn right: + gain; drawn in another shape or erased: - nominal (the erased one on the background)
        assert float(totals[0] - totals[2]) == pytest.approx(gain + nominal, rel=1e-4)
        assert float(totals[0] - totals[3]) == pytest.approx(gain + nominal, rel=1e-4)
        background = ~(masks[2] | torch.stack([o["mask"] for o in scene.objects[1:]] or [torch.zeros_like(masks[2])]).any(0))
        assert (out.reward[3][background] < 0).all()  # the erased object's cost has no place: the whole background


def test_pixels_near_no_palette_colour_get_no_feedback(scenes):
    image = scenes.images[0].clone()
    image[:, :4, :4] = torch.tensor([0.5, 0.25, 0.9]).view(3, 1, 1)  # far from every palette colour
    out = get_reward("scene_alignment")(image[None], [scenes.captions[0]], [{}])
    assert (out.weight[0, :4, :4] == 0).all() and (out.weight[0, 4:] == 1).all()


def test_nothing_beats_the_drawn_caption(scenes):
    scene = scenes.scenes[1]
    images, _ = broken_copies(scene)
    others = torch.stack([torch.zeros_like(scene.image), torch.ones_like(scene.image), scenes.images[2]])
    out = get_reward("scene_alignment")(torch.cat([scene.image[None], images, others]), [scene.caption] * 7, [{}] * 7)
    means = out.reward.mean(dim=(1, 2))
    assert (means[0] > means[1:]).all()


def test_object_area_option_and_errors(scenes):
    small = get_reward("scene_alignment", object_area=0.01)(scenes.images[:1], scenes.captions[:1], [{}]).reward
    assert float(small.max()) < 1.0 and np.isclose(float(small.sum()), 0.01 * 64 * 64 * len(scenes.scenes[0].objects))
    with pytest.raises(RewardError, match="object_area=0.*fraction"):
        get_reward("scene_alignment", object_area=0.0)
    with pytest.raises(RewardError, match="'scene_alignment' scores only scene captions.*scene grammar"):
        get_reward("scene_alignment")(scenes.images[:1], ["a photo of a cat"], [{}])
    with pytest.raises(RewardError, match="1 images but 2 prompts"):
        get_reward("scene_alignment")(scenes.images[:1], scenes.captions[:2], [{}])
