"""Every backend of the ops against the pure-PyTorch reference (SPEC §1-5), and the identities of SPEC §5."""
import math

import pytest
import torch

import pxpo_ext
from pxpo_ext import reference as ref
from pxpo_ext.reference import ELEMENT, MEAN, PIXEL, PPO, SF

from conftest import TOL

GRANS = {"element": ELEMENT, "pixel": PIXEL, "mean": MEAN}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [(1, 4, 8, 8), (3, 4, 7, 5), (2, 3, 13, 17), (5, 4, 16, 16)]


def make_latents(shape, dtype, device, non_contiguous=False):
    b, c, h, w = shape
    mean = torch.randn(shape, device=device).to(dtype)
    std = 0.3 + torch.rand(b, device=device)
    x = (mean.float() + std.view(-1, 1, 1, 1) * torch.randn(shape, device=device)).to(dtype)
    if non_contiguous:  # same values, channels-last strides
        x = x.contiguous(memory_format=torch.channels_last)
        mean = mean.contiguous(memory_format=torch.channels_last)
        assert not x.is_contiguous()
    return x, mean, std


def make_loss_inputs(shape, dtype, device, granularity, weights="random", per_element_adv=False, spread=0.1):
    x, mean, std = make_latents(shape, dtype, device)
    b, c, h, w = shape
    g = GRANS[granularity]
    logp = ref.gaussian_logprob(x, mean, std, g)
    logp_old = logp + spread * torch.randn_like(logp)  # ratios spread around 1, on both sides of the clip
    if g == MEAN:
        adv = torch.randn(b, device=device)
    elif per_element_adv:
        adv = torch.randn(b, c, h, w, device=device)
    else:
        adv = torch.randn(b, h, w, device=device)
    weight = None
    if weights == "random" and g != MEAN:
        weight = torch.rand(b, h, w, device=device)
        weight[weight < 0.2] = 0.0
    elif weights == "zero_image" and g != MEAN:
        weight = torch.rand(b, h, w, device=device)
        weight[0] = 0.0
    return x, mean, std, logp_old, adv, weight


def reference_loss(x, mean, std, logp_old, adv, weight, clip, granularity, loss_type):
    """Loss, gradient into ``mean`` and stats from the reference, in float32 from the same inputs."""
    m = mean.detach().clone().requires_grad_(True)
    loss, stats = ref.pxpo_loss(x, m, std, logp_old, adv, weight, clip, GRANS[granularity], {"ppo": PPO, "sf": SF}[loss_type])
    loss.backward()
    return loss.detach(), m.grad, stats


def assert_close(actual, expected, dtype, scale=None, msg=""):
    atol, rtol = TOL[dtype]
    expected = expected.to(actual.dtype) if actual.dtype != expected.dtype else expected
    if scale is not None:  # compare relative to the tensor's magnitude (gradients of a mean loss are tiny)
        atol = atol * max(float(scale), 1e-30)
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol, msg=msg or None)


# ---------------------------------------------------------------- log-probability

@pytest.mark.parametrize("granularity", list(GRANS))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_gaussian_logprob_matches_reference(backend, device, granularity, dtype, shape):
    x, mean, std = make_latents(shape, dtype, device)
    got = pxpo_ext.gaussian_logprob(x, mean, std, granularity)
    want = ref.gaussian_logprob(x, mean, std, GRANS[granularity])
    assert got.dtype == torch.float32 and got.shape == want.shape
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("granularity", list(GRANS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gaussian_logprob_gradient_matches_reference(backend, device, granularity, dtype):
    x, mean, std = make_latents((3, 4, 9, 6), dtype, device, non_contiguous=True)
    m = mean.detach().clone().requires_grad_(True)
    out = pxpo_ext.gaussian_logprob(x, m, std, granularity)
    grad_out = torch.randn_like(out)
    (got,) = torch.autograd.grad(out, m, grad_out)
    m_ref = mean.detach().clone().requires_grad_(True)
    (want,) = torch.autograd.grad(ref.gaussian_logprob(x, m_ref, std, GRANS[granularity]), m_ref, grad_out)
    assert got.dtype == mean.dtype
    assert_close(got, want, dtype, scale=want.abs().max())


def test_gaussian_logprob_scalar_std_equals_per_sample(backend, device):
    x, mean, _ = make_latents((2, 4, 5, 5), torch.float32, device)
    a = pxpo_ext.gaussian_logprob(x, mean, 0.7)
    b = pxpo_ext.gaussian_logprob(x, mean, torch.full((2,), 0.7, device=device))
    torch.testing.assert_close(a, b)


# ---------------------------------------------------------------- reward pooling

@pytest.mark.parametrize("size,latent", [((64, 64), (16, 16)), ((32, 24), (4, 3)), ((37, 29), (8, 6)), ((5, 7), (5, 7)),
                                         ((9, 9), (4, 4)), ((3, 50), (2, 7))])
@pytest.mark.parametrize("weighted", [False, True])
def test_reward_to_latent_matches_reference(backend, device, size, latent, weighted):
    reward = torch.randn(3, *size, device=device)
    weight = None
    if weighted:
        weight = torch.rand(3, *size, device=device)
        weight[weight < 0.3] = 0.0
        weight[1] = 0.0  # one image with no feedback at all
    r, w = pxpo_ext.reward_to_latent(reward, latent, weight)
    r_ref, w_ref = ref.reward_to_latent(reward, weight, *latent)
    torch.testing.assert_close(r, r_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(w, w_ref, atol=1e-6, rtol=1e-5)
    if weighted:
        assert torch.all(r[1] == 0) and torch.all(w[1] == 0)


def test_reward_to_latent_is_block_average_for_integer_factors(backend, device):
    reward = torch.randn(2, 32, 32, device=device)
    r, w = pxpo_ext.reward_to_latent(reward, 4)
    torch.testing.assert_close(r, reward.view(2, 4, 8, 4, 8).mean(dim=(2, 4)), atol=1e-5, rtol=1e-5)
    assert torch.all(w == 1)


def test_reward_to_latent_accepts_channel_axis_and_scalars(backend, device):
    reward = torch.randn(2, 1, 16, 16, device=device)
    r1, _ = pxpo_ext.reward_to_latent(reward, (4, 4))
    r2, _ = pxpo_ext.reward_to_latent(reward[:, 0], (4, 4))
    torch.testing.assert_close(r1, r2)
    scalars = torch.tensor([0.5, -2.0], device=device)
    r, w = pxpo_ext.reward_to_latent(scalars, (3, 5))
    assert r.shape == (2, 3, 5) and torch.all(r[0] == 0.5) and torch.all(r[1] == -2.0) and torch.all(w == 1)


@pytest.mark.parametrize("shape", [(2, 0, 8), (2, 8, 0), (2, 1, 0, 8)])
def test_empty_reward_maps_are_refused_on_every_backend(backend, device, shape):
    with pytest.raises(ValueError, match="my_reward returned empty reward maps"):
        pxpo_ext.reward_to_latent(torch.zeros(shape, device=device), 2, source="my_reward")


def test_weighted_reward_ignores_unweighted_pixels(backend, device):
    reward = torch.zeros(1, 8, 8, device=device)
    weight = torch.zeros(1, 8, 8, device=device)
    reward[0, :2, :2] = 3.0  # marked region
    weight[0, :2, :2] = 1.0
    reward[0, 2:, :] = -100.0  # garbage where nothing was marked
    r, w = pxpo_ext.reward_to_latent(reward, 2, weight)
    assert r[0, 0, 0].item() == pytest.approx(3.0)  # only weighted pixels count, not their average with zeros
    assert w[0, 0, 0].item() == pytest.approx(4 / 16)
    assert r[0, 1, 1].item() == 0.0 and w[0, 1, 1].item() == 0.0


# ---------------------------------------------------------------- the loss

@pytest.mark.parametrize("loss_type", ["ppo", "sf"])
@pytest.mark.parametrize("granularity", list(GRANS))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_pxpo_loss_matches_reference(backend, device, loss_type, granularity, dtype, shape):
    inputs = make_loss_inputs(shape, dtype, device, granularity)
    clip = 0.05
    want_loss, want_grad, want_stats = reference_loss(*inputs, clip, granularity, loss_type)
    x, mean, std, logp_old, adv, weight = inputs
    m = mean.detach().clone().requires_grad_(True)
    loss, stats = pxpo_ext.pxpo_loss(x, m, std, logp_old, adv, weight, clip, granularity, loss_type)
    loss.backward()
    torch.testing.assert_close(loss.float(), want_loss.float(), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(stats["approx_kl"].float(), want_stats[0].float(), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(stats["clipfrac"].float(), want_stats[1].float(), atol=1e-5, rtol=1e-4)
    assert stats["skipped"].item() == 0 == want_stats[2].item()  # tests/test_numerical_guards.py has skipped units
    assert m.grad.dtype == dtype
    assert_close(m.grad, want_grad, dtype, scale=want_grad.abs().max())


@pytest.mark.parametrize("granularity", ["element", "pixel"])
@pytest.mark.parametrize("weights", [None, "random", "zero_image"])
def test_pxpo_loss_and_grad_agrees_with_autograd_form(backend, device, granularity, weights):
    inputs = make_loss_inputs((4, 4, 6, 10), torch.float32, device, granularity, weights=weights or "none")
    x, mean, std, logp_old, adv, weight = inputs
    m = mean.detach().clone().requires_grad_(True)
    loss, stats = pxpo_ext.pxpo_loss(x, m, std, logp_old, adv, weight, 0.1, granularity)
    loss.backward()
    loss2, grad, stats2 = pxpo_ext.pxpo_loss_and_grad(x, mean, std, logp_old, adv, weight, 0.1, granularity)
    torch.testing.assert_close(loss2, loss.detach())
    torch.testing.assert_close(grad, m.grad)
    torch.testing.assert_close(stats2["clipfrac"], stats["clipfrac"])
    want_loss, want_grad, _ = reference_loss(*inputs, 0.1, granularity, "ppo")
    torch.testing.assert_close(loss2, want_loss, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(grad, want_grad, atol=1e-5 * want_grad.abs().max().item(), rtol=1e-4)


def test_pxpo_loss_per_element_advantages(backend, device):
    inputs = make_loss_inputs((2, 4, 5, 7), torch.float32, device, "element", per_element_adv=True)
    want_loss, want_grad, _ = reference_loss(*inputs, 0.1, "element", "ppo")
    loss, grad, _ = pxpo_ext.pxpo_loss_and_grad(*inputs, clip_range=0.1, granularity="element")
    torch.testing.assert_close(loss, want_loss, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(grad, want_grad, atol=1e-5 * want_grad.abs().max().item(), rtol=1e-4)


def test_pxpo_loss_non_contiguous_inputs(backend, device):
    x, mean, std = make_latents((3, 4, 8, 9), torch.float32, device, non_contiguous=True)
    logp = ref.gaussian_logprob(x, mean, std, PIXEL)
    logp_old = (logp + 0.1 * torch.randn_like(logp)).transpose(1, 2).contiguous().transpose(1, 2)
    adv = torch.randn(3, 9, 8, device=device).transpose(1, 2)  # non-contiguous (3, 8, 9)
    weight = torch.rand(3, 9, 8, device=device).transpose(1, 2)
    want_loss, want_grad, _ = reference_loss(x, mean, std, logp_old, adv, weight, 0.1, "pixel", "ppo")
    loss, grad, _ = pxpo_ext.pxpo_loss_and_grad(x, mean, std, logp_old, adv, weight, 0.1, "pixel")
    torch.testing.assert_close(loss, want_loss, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(grad.contiguous(), want_grad.contiguous(), atol=1e-5 * want_grad.abs().max().item(), rtol=1e-4)


@pytest.mark.parametrize("side", [-1, 1])
@pytest.mark.parametrize("adv_sign", [-1.0, 1.0])
def test_ratios_next_to_the_clip_boundary(backend, device, side, adv_sign):
    """Ratios a hair inside and outside 1 ± eps: the gradient switches off exactly where SPEC §5 says."""
    clip = 0.2
    x, mean, std = make_latents((2, 4, 6, 6), torch.float32, device)
    logp = ref.gaussian_logprob(x, mean, std, PIXEL)
    inside = torch.rand(2, 6, 6, device=device) < 0.5
    for upper in (True, False):
        boundary = math.log1p(clip) if upper else math.log1p(-clip)
        target = boundary + torch.where(inside, -1e-3, 1e-3) * (1 if upper else -1) * side
        logp_old = logp - target
        adv = torch.full((2, 6, 6), adv_sign, device=device)
        want_loss, want_grad, want_stats = reference_loss(x, mean, std, logp_old, adv, None, clip, "pixel", "ppo")
        loss, grad, stats = pxpo_ext.pxpo_loss_and_grad(x, mean, std, logp_old, adv, None, clip, "pixel")
        torch.testing.assert_close(loss, want_loss, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(stats["clipfrac"], want_stats[1], atol=1e-6, rtol=0)
        torch.testing.assert_close(grad, want_grad, atol=1e-5 * want_grad.abs().max().item(), rtol=1e-4)


def test_all_zero_weights_give_zero_loss_and_gradient(backend, device):
    x, mean, std, logp_old, adv, _ = make_loss_inputs((2, 4, 5, 5), torch.float32, device, "pixel")
    weight = torch.zeros(2, 5, 5, device=device)
    loss, grad, stats = pxpo_ext.pxpo_loss_and_grad(x, mean, std, logp_old, adv, weight, 0.1)
    assert loss.item() == 0.0 and torch.all(grad == 0)
    assert stats["approx_kl"].item() == 0.0 and stats["clipfrac"].item() == 0.0
    assert stats["skipped"].item() == 0.0


# ---------------------------------------------------------------- identities of SPEC §5

def _on_policy(shape, device, granularity):
    x, mean, std = make_latents(shape, torch.float32, device)
    logp_old = ref.gaussian_logprob(x, mean, std, GRANS[granularity])
    return x, mean, std, logp_old


def test_loss_is_one_for_negative_unit_advantage_on_policy(backend, device):
    for granularity in GRANS:
        x, mean, std, logp_old = _on_policy((3, 4, 5, 6), device, granularity)
        adv = -torch.ones_like(logp_old if granularity != "element" else logp_old[:, 0])
        loss, stats = pxpo_ext.pxpo_loss(x, mean, std, logp_old, adv, None, 1e-4 if granularity == "mean" else 0.2,
                                         granularity)
        assert loss.item() == pytest.approx(1.0, abs=1e-6)
        assert stats["approx_kl"].item() == pytest.approx(0.0, abs=1e-12)
        assert stats["clipfrac"].item() == 0.0


@pytest.mark.parametrize("loss_type", ["ppo", "sf"])
def test_constant_map_pixel_gradient_is_C_times_ddpo(backend, device, loss_type):
    b, c, h, w = 3, 4, 6, 5
    x, mean, std, _ = _on_policy((b, c, h, w), device, "pixel")
    a = torch.randn(b, device=device)
    _, g_pixel, _ = pxpo_ext.pxpo_loss_and_grad(x, mean, std, ref.gaussian_logprob(x, mean, std, PIXEL),
                                                a.view(-1, 1, 1).expand(b, h, w), None, 0.2, "pixel", loss_type)
    _, g_elem, _ = pxpo_ext.pxpo_loss_and_grad(x, mean, std, ref.gaussian_logprob(x, mean, std, ELEMENT),
                                               a.view(-1, 1, 1).expand(b, h, w), None, 0.2, "element", loss_type)
    _, g_ddpo, _ = pxpo_ext.pxpo_loss_and_grad(x, mean, std, ref.gaussian_logprob(x, mean, std, MEAN), a, None, 1e-4,
                                               "mean", loss_type)
    scale = g_ddpo.abs().max().item()
    torch.testing.assert_close(g_pixel, c * g_ddpo, atol=1e-5 * c * scale, rtol=1e-4)
    torch.testing.assert_close(g_elem, g_ddpo, atol=1e-5 * scale, rtol=1e-4)


def test_on_policy_ppo_gradient_equals_score_function_gradient(backend, device):
    """At ratio 1 both max terms tie; the gradient must be the whole unclipped one, not half."""
    x, mean, std, logp_old = _on_policy((2, 4, 7, 7), device, "pixel")
    adv = torch.randn(2, 7, 7, device=device)
    weight = torch.rand(2, 7, 7, device=device)
    _, g_ppo, _ = pxpo_ext.pxpo_loss_and_grad(x, mean, std, logp_old, adv, weight, 0.2, "pixel", "ppo")
    _, g_sf, _ = pxpo_ext.pxpo_loss_and_grad(x, mean, std, logp_old, adv, weight, 0.2, "pixel", "sf")
    torch.testing.assert_close(g_ppo, g_sf, atol=1e-6 * g_sf.abs().max().item(), rtol=1e-5)


def test_only_the_weighted_block_gets_gradient(backend, device):
    """Reward map weighted in one block of image pixels: only that latent pixel's channels move."""
    b, c, h, w, f = 2, 4, 4, 4, 8
    x, mean, std, logp_old = _on_policy((b, c, h, w), device, "pixel")
    reward = torch.randn(b, h * f, w * f, device=device)
    weight = torch.zeros(b, h * f, w * f, device=device)
    weight[:, f:2 * f, 2 * f:3 * f] = 1.0  # latent pixel (1, 2)
    r, wl = pxpo_ext.reward_to_latent(reward, (h, w), weight)
    _, grad, _ = pxpo_ext.pxpo_loss_and_grad(x, mean, std, logp_old, r, wl, 0.2, "pixel")
    mask = torch.zeros(h, w, dtype=torch.bool, device=device)
    mask[1, 2] = True
    assert torch.all(grad[:, :, ~mask] == 0)
    assert torch.all(grad[:, :, 1, 2].abs() > 0)


# ---------------------------------------------------------------- KL to a reference policy (plain PyTorch, no backend)

@pytest.mark.parametrize("granularity", list(GRANS))
def test_gaussian_kl_is_the_gaussian_kl_in_the_granularity_units(granularity):
    g = torch.Generator().manual_seed(0)
    mean, ref_mean = torch.randn(2, 3, 2, 4, 5, generator=g, dtype=torch.float64)
    std = 0.2 + torch.rand(3, generator=g, dtype=torch.float64)
    sigma = std.view(-1, 1, 1, 1)
    per_element = torch.distributions.kl_divergence(torch.distributions.Normal(mean, sigma),
                                                    torch.distributions.Normal(ref_mean, sigma))
    # A pixel's KL is its channels' sum (its log-prob is their sum); averaged over the units, so (B,).
    expected = per_element.sum(1).mean((1, 2)) if granularity == "pixel" else per_element.mean((1, 2, 3))
    torch.testing.assert_close(pxpo_ext.gaussian_kl(mean, ref_mean, std, granularity), expected)
    assert torch.all(pxpo_ext.gaussian_kl(mean, mean.clone(), std, granularity) == 0)


def test_gaussian_kl_gradient_flows_into_mean_only():
    g = torch.Generator().manual_seed(1)
    mean = torch.randn(2, 4, 3, 3, generator=g, dtype=torch.float64, requires_grad=True)
    ref_mean = torch.randn(2, 4, 3, 3, generator=g, dtype=torch.float64, requires_grad=True)
    std = torch.tensor([0.3, 0.7], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda m: pxpo_ext.gaussian_kl(m, ref_mean, std, "pixel"), (mean,))
    pxpo_ext.gaussian_kl(mean, ref_mean, std, "pixel").sum().backward()
    assert ref_mean.grad is None
    # d/dmean of mean over pixels of sum_c (m - r)^2 / (2 s^2) is (m - r) / (s^2 h w)
    expected = (mean - ref_mean).detach() / (std.view(-1, 1, 1, 1) ** 2 * 9)
    torch.testing.assert_close(mean.grad, expected)


def test_gaussian_kl_computes_in_float32_for_half_inputs():
    mean = torch.randn(2, 4, 3, 3).bfloat16()
    kl = pxpo_ext.gaussian_kl(mean, torch.zeros_like(mean), 0.5, "element")
    assert kl.dtype == torch.float32
    torch.testing.assert_close(kl, (mean.float() ** 2 / 0.5).mean((1, 2, 3)))


# ---------------------------------------------------------------- argument checks (every backend sees the same)

def test_errors_are_clear():
    x, mean, std = make_latents((2, 4, 3, 3), torch.float32, "cpu")
    logp_old = torch.zeros(2, 3, 3)
    adv = torch.zeros(2, 3, 3)
    with pytest.raises(ValueError, match="granularity must be one of"):
        pxpo_ext.gaussian_logprob(x, mean, std, "channel")
    with pytest.raises(TypeError, match="same dtype"):
        pxpo_ext.gaussian_logprob(x, mean.half(), std)
    with pytest.raises(ValueError, match="std must be finite and > 0"):
        pxpo_ext.gaussian_logprob(x, mean, 0.0)
    with pytest.raises(ValueError, match="std must be finite and > 0"):
        pxpo_ext.gaussian_logprob(x, mean, torch.tensor([0.5, 0.0]))
    with pytest.raises(ValueError, match="empty batch"):
        pxpo_ext.gaussian_logprob(x[:0], mean[:0], 1.0)
    with pytest.raises(ValueError, match="mean and ref_mean must have the same shape"):
        pxpo_ext.gaussian_kl(mean, mean[:, :2], std)
    with pytest.raises(ValueError, match="std must be finite and > 0"):
        pxpo_ext.gaussian_kl(mean, mean, 0.0)
    with pytest.raises(ValueError, match="advantages must have shape"):
        pxpo_ext.pxpo_loss(x, mean, std, logp_old, adv[:, :2], None, 0.1)
    with pytest.raises(ValueError, match="clip_range must be a number > 0"):
        pxpo_ext.pxpo_loss(x, mean, std, logp_old, adv, None, 0.0)
    with pytest.raises(ValueError, match="loss_type must be one of"):
        pxpo_ext.pxpo_loss(x, mean, std, logp_old, adv, None, 0.1, loss_type="dpo")
    with pytest.raises(ValueError, match="takes no weight map"):
        pxpo_ext.pxpo_loss(x, mean, std, torch.zeros(2), torch.zeros(2), torch.ones(2, 3, 3), 0.1, "mean")
    with pytest.raises(ValueError, match="NaN or infinity"):
        pxpo_ext.reward_to_latent(torch.tensor([[[float("nan")]]]), 1, source="my_reward")
    with pytest.raises(ValueError, match="my_reward returned rewards of shape"):
        pxpo_ext.reward_to_latent(torch.zeros(2, 3), 1, source="my_reward")
    with pytest.raises(ValueError, match="weights outside"):
        pxpo_ext.reward_to_latent(torch.zeros(1, 4, 4), 2, torch.full((1, 4, 4), 1.5))
    with pytest.raises(ValueError, match="must match"):
        pxpo_ext.reward_to_latent(torch.zeros(1, 4, 4), 2, torch.ones(1, 4, 5))


def test_forcing_an_unavailable_backend_fails_clearly(monkeypatch):
    x, mean, std = make_latents((1, 4, 2, 2), torch.float32, "cpu")
    monkeypatch.setenv("PXPO_BACKEND", "cuda")
    with pytest.raises(pxpo_ext.BackendUnavailable, match="cuda"):
        pxpo_ext.gaussian_logprob(x, mean, std)
    monkeypatch.setenv("PXPO_BACKEND", "fortran")
    with pytest.raises(pxpo_ext.BackendUnavailable, match="not a backend"):
        pxpo_ext.gaussian_logprob(x, mean, std)
