"""``ddim_step_with_logprob`` against diffusers' ``DDIMScheduler.step`` and DDPO's log-prob (SPEC §1)."""
import math

import pytest
import torch
from diffusers import DDIMScheduler

import pxpo_ext

SD15 = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False)


def scheduler(**overrides):
    cfg = dict(SD15, set_alpha_to_one=False, steps_offset=1)
    cfg.update(overrides)
    s = DDIMScheduler(**cfg)
    s.set_timesteps(10)
    return s


def trainable_steps(s, eta=1.0):
    return [int(t) for t, sig in zip(s.timesteps, pxpo_ext.ddim_sigmas(s, eta)) if sig > 0]


CONFIGS = [
    dict(),
    dict(prediction_type="v_prediction"),
    dict(prediction_type="sample", clip_sample=True, clip_sample_range=1.5),
    dict(set_alpha_to_one=True, steps_offset=0),
    dict(timestep_spacing="trailing"),
    dict(timestep_spacing="linspace", steps_offset=0),
    dict(thresholding=True, prediction_type="sample", sample_max_value=1.2),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=[str(c) for c in CONFIGS])
@pytest.mark.parametrize("eta", [1.0, 0.5])
def test_prev_sample_matches_diffusers(cfg, eta):
    s = scheduler(**cfg)
    shape = (2, 4, 8, 8)
    for t in trainable_steps(s, eta):
        x, e, z = torch.randn(shape), torch.randn(shape), torch.randn(shape)
        want = s.step(e, t, x, eta=eta, variance_noise=z).prev_sample
        mean, std = pxpo_ext.ddim_mean_and_std(s, e, t, x, eta)
        torch.testing.assert_close(mean + std.view(-1, 1, 1, 1) * z, want, atol=1e-6, rtol=1e-5)
        g1, g2 = torch.Generator().manual_seed(t), torch.Generator().manual_seed(t)
        want_g = s.step(e, t, x, eta=eta, generator=g1).prev_sample
        got_g = pxpo_ext.ddim_step_with_logprob(s, e, t, x, eta=eta, generator=g2).prev_sample
        torch.testing.assert_close(got_g, want_g, atol=1e-6, rtol=1e-5)


def test_batched_timesteps_match_per_sample_steps():
    s = scheduler()
    steps = trainable_steps(s)
    t = torch.tensor([steps[0], steps[3], steps[-1]])
    x, e, z = torch.randn(3, 4, 6, 6), torch.randn(3, 4, 6, 6), torch.randn(3, 4, 6, 6)
    mean, std = pxpo_ext.ddim_mean_and_std(s, e, t, x)
    for i in range(3):
        want = s.step(e[i:i + 1], int(t[i]), x[i:i + 1], eta=1.0, variance_noise=z[i:i + 1]).prev_sample
        torch.testing.assert_close(mean[i:i + 1] + std[i] * z[i:i + 1], want, atol=1e-6, rtol=1e-5)


def test_mean_log_prob_equals_ddpo(backend, device):
    """DDPO's per-image log-prob: the mean over latent elements of the Gaussian log-density."""
    s = scheduler()
    t = trainable_steps(s)[2]
    x, e = torch.randn(3, 4, 8, 8, device=device), torch.randn(3, 4, 8, 8, device=device)
    out = pxpo_ext.ddim_step_with_logprob(s, e, t, x, eta=1.0, granularity="mean",
                                          generator=torch.Generator(device=device).manual_seed(1))
    std = out.std.view(-1, 1, 1, 1)
    ddpo = (-((out.prev_sample - out.mean) ** 2) / (2 * std**2) - torch.log(std)
            - torch.log(torch.sqrt(2 * torch.as_tensor(math.pi)))).mean(dim=(1, 2, 3))
    torch.testing.assert_close(out.log_prob, ddpo, atol=2e-6, rtol=1e-6)
    pixel = pxpo_ext.ddim_step_with_logprob(s, e, t, x, prev_sample=out.prev_sample, granularity="pixel").log_prob
    torch.testing.assert_close(pixel.sum(dim=(1, 2)) / (4 * 8 * 8), out.log_prob, atol=2e-6, rtol=1e-5)


def test_half_precision_model_output_gives_float32_log_probs():
    s = scheduler()
    t = trainable_steps(s)[1]
    x, e = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4)
    out16 = pxpo_ext.ddim_step_with_logprob(s, e.half(), t, x, prev_sample=x)
    assert out16.log_prob.dtype == torch.float32 and out16.mean.dtype == torch.float32


def test_log_prob_is_differentiable_in_the_model_output():
    s = scheduler()
    t = trainable_steps(s)[0]
    x, e = torch.randn(1, 4, 4, 4), torch.randn(1, 4, 4, 4, requires_grad=True)
    out = pxpo_ext.ddim_step_with_logprob(s, e, t, x, prev_sample=torch.randn(1, 4, 4, 4))
    out.log_prob.sum().backward()
    assert e.grad is not None and torch.isfinite(e.grad).all() and e.grad.abs().sum() > 0


def test_deterministic_steps_are_refused():
    s = scheduler(set_alpha_to_one=True, steps_offset=0)
    last = int(s.timesteps[-1])
    assert pxpo_ext.ddim_sigmas(s, 1.0)[-1] == 0  # final alpha is 1: no noise on the last step
    x = torch.randn(1, 4, 4, 4)
    with pytest.raises(ValueError, match="deterministic"):
        pxpo_ext.ddim_step_with_logprob(s, x, last, x)
    with pytest.raises(ValueError, match="eta must be > 0"):
        pxpo_ext.ddim_step_with_logprob(s, x, int(s.timesteps[0]), x, eta=0.0)


def test_unset_scheduler_is_refused():
    s = DDIMScheduler(**SD15)
    with pytest.raises(ValueError, match="set_timesteps"):
        pxpo_ext.ddim_mean_and_std(s, torch.zeros(1, 4, 2, 2), 10, torch.zeros(1, 4, 2, 2))
