"""Stat tracking and advantages on latent reward maps (SPEC §4)."""
import pytest
import torch

from pxpo_ext.trainer.advantages import EPS, StatTracker, image_rewards


def _weighted_z(r, w, mu, sd):
    return (r - mu) / (sd + EPS)


def test_batch_statistics_over_all_weighted_pixels():
    r = torch.randn(4, 3, 3)
    w = torch.ones(4, 3, 3)
    tracker = StatTracker(per_prompt=False, adv_clip_max=100.0)
    adv = tracker.update(["a", "b", "c", "d"], r, w)
    mu, sd = r.mean(), r.std(unbiased=False)
    torch.testing.assert_close(adv, _weighted_z(r, w, mu, sd))
    assert tracker.buffers == {}  # batch-wide normalisation keeps no history


def test_weights_exclude_pixels_from_the_statistics():
    r = torch.tensor([[[1.0, 100.0]], [[3.0, -50.0]]])
    w = torch.tensor([[[1.0, 0.0]], [[1.0, 0.0]]])
    adv = StatTracker(per_prompt=False, adv_clip_max=100.0).update(["a", "b"], r, w)
    # mu = 2, sd = 1 over the two weighted pixels; the unweighted ones do not move them
    torch.testing.assert_close(adv[:, 0, 0], torch.tensor([-1.0, 1.0]) / (1 + EPS))


def test_no_spatial_mean_subtraction_by_default():
    # every pixel of image 0 is better than every pixel of image 1: all of image 0's advantages are positive
    r = torch.stack([torch.full((2, 2), 1.0) + torch.tensor([[0.0, 0.1], [0.2, 0.3]]), torch.zeros(2, 2)])
    adv = StatTracker(per_prompt=False).update(["p", "p"], r, torch.ones_like(r))
    assert (adv[0] > 0).all() and (adv[1] < 0).all()


def test_per_location_baseline():
    r = torch.tensor([[[1.0, 10.0]], [[3.0, 14.0]]])
    adv = StatTracker(per_prompt=False, baseline="location", adv_clip_max=100.0).update(["a", "b"], r,
                                                                                      torch.ones_like(r))
    residual = r - torch.tensor([[2.0, 12.0]])
    torch.testing.assert_close(adv, residual / (residual.pow(2).mean().sqrt() + EPS))


def test_per_prompt_buffer_falls_back_to_batch_until_min_count():
    torch.manual_seed(0)
    tracker = StatTracker(per_prompt=True, buffer_size=4, min_count=3, adv_clip_max=100.0)
    r1 = torch.tensor([0.0, 10.0, 20.0, 30.0]).view(4, 1, 1)
    prompts = ["x", "x", "y", "y"]
    adv1 = tracker.update(prompts, r1, torch.ones_like(r1))
    # two per prompt < min_count 3: whole-batch statistics
    torch.testing.assert_close(adv1, (r1 - r1.mean()) / (r1.std(unbiased=False) + EPS))
    r2 = torch.tensor([4.0, 6.0, 40.0, 50.0]).view(4, 1, 1)
    adv2 = tracker.update(prompts, r2, torch.ones_like(r2))
    x_group = torch.tensor([0.0, 10.0, 4.0, 6.0])  # x's buffer now holds 4 >= 3
    expected_x = (r2[:2].flatten() - x_group.mean()) / (x_group.std(unbiased=False) + EPS)
    torch.testing.assert_close(adv2[:2].flatten(), expected_x)
    assert [len(tracker.buffers[p]) for p in ("x", "y")] == [4, 4]
    tracker.update(prompts, r2, torch.ones_like(r2))
    assert len(tracker.buffers["x"]) == 4  # buffer_size caps the history


def test_advantages_are_clipped():
    r = torch.tensor([0.0] * 99 + [1.0]).view(100, 1, 1)
    adv = StatTracker(per_prompt=False, adv_clip_max=2.0).update([str(i) for i in range(100)], r, torch.ones_like(r))
    assert adv.max().item() == 2.0 and adv.min().item() > -2.0


def test_no_feedback_gives_zero_advantages():
    r = torch.randn(2, 2, 2)
    adv = StatTracker(per_prompt=False).update(["a", "b"], r, torch.zeros_like(r))
    assert torch.equal(adv, torch.zeros_like(r))


def test_image_rewards_are_weighted_means():
    r = torch.tensor([[[1.0, 3.0]], [[5.0, 7.0]], [[2.0, 2.0]]])
    w = torch.tensor([[[1.0, 1.0]], [[0.0, 1.0]], [[0.0, 0.0]]])
    mean, has = image_rewards(r, w)
    assert mean.shape == (3, 1, 1)
    torch.testing.assert_close(mean.flatten(), torch.tensor([2.0, 7.0, 0.0]))
    torch.testing.assert_close(has.flatten(), torch.tensor([1.0, 1.0, 0.0]))


def test_ddpo_scalars_match_ddpo_normalisation():
    scalars = torch.tensor([1.0, 2.0, 4.0, 9.0])
    maps = scalars.view(-1, 1, 1).expand(-1, 4, 4)
    img, has = image_rewards(maps, torch.ones_like(maps))
    adv = StatTracker(per_prompt=False, adv_clip_max=100.0).update(list("abcd"), img, has).flatten()
    torch.testing.assert_close(adv, (scalars - scalars.mean()) / (scalars.std(unbiased=False) + EPS))


def test_state_dict_round_trip_continues_identically():
    a = StatTracker(per_prompt=True, buffer_size=3, min_count=2)
    r = torch.randn(4, 2, 2)
    a.update(["p", "q", "p", "q"], r, torch.ones_like(r))
    b = StatTracker(per_prompt=True, buffer_size=3, min_count=2)
    b.load_state_dict(a.state_dict())
    r2 = torch.randn(4, 2, 2)
    w2 = torch.rand(4, 2, 2)
    assert torch.equal(a.update(["p", "q", "q", "q"], r2, w2), b.update(["p", "q", "q", "q"], r2, w2))
    assert all(len(b.buffers[p]) <= 3 for p in b.buffers)


def test_shape_errors_are_explained():
    with pytest.raises(ValueError, match="reward and weight maps"):
        StatTracker().update(["a"], torch.zeros(1, 2, 2), torch.zeros(1, 3, 3))
    tracker = StatTracker(min_count=0)
    tracker.update(["a"], torch.zeros(1, 2, 2), torch.ones(1, 2, 2))
    with pytest.raises(ValueError, match="latent size must not change"):
        tracker.update(["a"], torch.zeros(1, 3, 3), torch.ones(1, 3, 3))
    with pytest.raises(ValueError, match="baseline"):
        StatTracker(baseline="pixel")


def test_std_floor_shrinks_the_advantages_of_a_group_that_barely_differs():
    # A saturated reward: maps within 1e-3 of each other. Without a floor their differences become
    # full-size advantages; with a floor above their spread they stay in proportion to the floor.
    r = 0.98 + 1e-3 * torch.randn(4, 3, 3, generator=torch.Generator().manual_seed(0))
    w = torch.ones_like(r)
    plain = StatTracker(per_prompt=False, adv_clip_max=100.0).update(["p"] * 4, r, w)
    floored = StatTracker(per_prompt=False, adv_clip_max=100.0, std_floor=0.1).update(["p"] * 4, r, w)
    assert plain.std() > 0.9
    torch.testing.assert_close(floored, (r - r.mean()) / (0.1 + EPS))
    # A spread above the floor is normalised as without one.
    wide = torch.randn(4, 3, 3, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(StatTracker(per_prompt=False, adv_clip_max=100.0, std_floor=0.1).update(["p"] * 4, wide, w),
                               StatTracker(per_prompt=False, adv_clip_max=100.0).update(["p"] * 4, wide, w))
    with pytest.raises(ValueError, match="std_floor must be >= 0"):
        StatTracker(std_floor=-1.0)
