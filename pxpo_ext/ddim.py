"""One DDIM step as a Gaussian policy (SPEC §1): mean, sigma, the sample and its log-probability.

Matches diffusers' ``DDIMScheduler.step(..., eta, variance_noise=z)`` on ``prev_sample``, with
batched timesteps (one per sample) and every arithmetic in float32, whatever the model's dtype.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.utils.torch_utils import randn_tensor

from .ops import gaussian_logprob


@dataclass
class DDIMStepOutput:
    prev_sample: torch.Tensor  # (B, C, h, w) float32, the action x_s
    log_prob: torch.Tensor  # float32, shaped by granularity
    mean: torch.Tensor  # (B, C, h, w) float32, differentiable in the model output
    std: torch.Tensor  # (B,) float32


def _timesteps(scheduler, timestep, batch: int, device: torch.device) -> torch.Tensor:
    if scheduler.num_inference_steps is None:
        raise ValueError("the scheduler has no timesteps yet: call scheduler.set_timesteps(num_steps) first")
    t = torch.as_tensor(timestep)
    if t.dim() == 0:
        t = t.reshape(1).expand(batch)
    if t.shape != (batch,):
        raise ValueError(f"timestep must be a scalar or have one entry per sample ({batch}), got shape {tuple(t.shape)}")
    if t.dtype.is_floating_point:
        t = t.round()
    return t.to(device=device, dtype=torch.long)


def _schedule_tables(scheduler, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``alphas_cumprod`` and the final alpha as float32 tensors on ``device``, cached on the scheduler.

    Copying them from the host at every step would make each step wait for the GPU (a pageable
    host-to-device copy synchronises), so a sampling or training loop would never run ahead.
    """
    key = (device, scheduler.alphas_cumprod.data_ptr(), float(scheduler.final_alpha_cumprod))
    cache = scheduler.__dict__.setdefault("_pxpo_tables", {})
    if key not in cache:
        cache[key] = (scheduler.alphas_cumprod.to(device=device, dtype=torch.float32),
                      torch.as_tensor(scheduler.final_alpha_cumprod, dtype=torch.float32).reshape(1).to(device))
    return cache[key]


def _alphas(scheduler, t: torch.Tensor):
    """``(a_t, a_s)`` for timesteps ``t`` on ``t``'s device, float32, as diffusers picks them."""
    acp, final = _schedule_tables(scheduler, t.device)
    prev = t - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    a_t = acp[t]
    a_s = torch.where(prev >= 0, acp[prev.clamp(min=0)], final)
    return a_t, a_s


def ddim_sigmas(scheduler, eta: float) -> torch.Tensor:
    """Sigma of each step of ``scheduler.timesteps`` (CPU, float32); 0 marks a deterministic step."""
    t = scheduler.timesteps.to("cpu", torch.long)
    a_t, a_s = _alphas(scheduler, t)
    variance = (1 - a_s) / (1 - a_t) * (1 - a_t / a_s)
    return eta * variance.clamp(min=0) ** 0.5


def ddim_mean_and_std(scheduler, model_output: torch.Tensor, timestep, sample: torch.Tensor, eta: float = 1.0):
    """The DDIM step's Gaussian: ``(mean, std)`` with ``mean`` (B, C, h, w) and ``std`` (B,), float32.

    Supports epsilon, v and sample prediction, ``clip_sample`` and ``thresholding``.
    """
    if sample.shape != model_output.shape:
        raise ValueError(f"model_output {tuple(model_output.shape)} and sample {tuple(sample.shape)} differ in shape")
    batch = sample.shape[0]
    t = _timesteps(scheduler, timestep, batch, sample.device)
    a_t, a_s = _alphas(scheduler, t)
    view = (-1,) + (1,) * (sample.dim() - 1)
    a_t, a_s = a_t.view(view), a_s.view(view)
    x = sample.float()
    out = model_output.float()
    beta_t = 1 - a_t
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        x0 = (x - beta_t ** (0.5) * out) / a_t ** (0.5)
        eps = out
    elif kind == "sample":
        x0 = out
        eps = (x - a_t ** (0.5) * x0) / beta_t ** (0.5)
    elif kind == "v_prediction":
        x0 = (a_t**0.5) * x - (beta_t**0.5) * out
        eps = (a_t**0.5) * out + (beta_t**0.5) * x
    else:
        raise ValueError(f"prediction_type {kind!r} is not supported: use epsilon, sample or v_prediction")
    if scheduler.config.thresholding:
        x0 = scheduler._threshold_sample(x0)
    elif scheduler.config.clip_sample:
        x0 = x0.clamp(-scheduler.config.clip_sample_range, scheduler.config.clip_sample_range)
    variance = (1 - a_s) / (1 - a_t) * (1 - a_t / a_s)
    std = eta * variance ** (0.5)
    mean = a_s ** (0.5) * x0 + (1 - a_s - std**2) ** (0.5) * eps
    return mean, std.reshape(batch)


def ddim_step_with_logprob(scheduler, model_output: torch.Tensor, timestep, sample: torch.Tensor, eta: float = 1.0,
                           prev_sample: torch.Tensor | None = None, generator: torch.Generator | None = None,
                           granularity: str = "pixel", variance_noise: torch.Tensor | None = None) -> DDIMStepOutput:
    """A DDIM step that also returns the log-probability of its sample (SPEC §1-2).

    ``timestep``: an int or one per sample. Without ``prev_sample`` a sample is drawn:
    ``mean + std * variance_noise`` where given (as in ``DDIMScheduler.step``), else with noise
    from ``generator``; with ``prev_sample``, its log-probability under the step's Gaussian is
    returned (the training case). ``granularity``: ``"element"`` (B, C, h, w), ``"pixel"`` (B, h, w) or
    ``"mean"`` (B,). A step with sigma = 0 (eta = 0, or a final step whose alpha_prev is 1)
    has no density and raises ``ValueError``.
    """
    if not eta > 0:
        raise ValueError(f"eta must be > 0 for a step to have a log-probability, got {eta}")
    mean, std = ddim_mean_and_std(scheduler, model_output, timestep, sample, eta)
    host_t = timestep if isinstance(timestep, torch.Tensor) else torch.as_tensor(timestep)
    if host_t.device.type == "cpu":  # device timesteps are checked by the caller (the trainer uses ddim_sigmas)
        t = _timesteps(scheduler, host_t, sample.shape[0], torch.device("cpu"))
        a_t, a_s = _alphas(scheduler, t)
        if bool(((1 - a_s) / (1 - a_t) * (1 - a_t / a_s) <= 0).any()):
            raise ValueError(
                f"timestep(s) {sorted(set(t.tolist()))} are deterministic (sigma = 0, the scheduler's final "
                "alpha is 1): they have no log-probability; leave them out of training"
            )
    if prev_sample is not None and variance_noise is not None:
        raise ValueError("pass prev_sample (score a given sample) or variance_noise (draw one), not both")
    if prev_sample is None:
        if variance_noise is None:
            noise = randn_tensor(mean.shape, generator=generator, device=mean.device, dtype=torch.float32)
        elif variance_noise.shape != mean.shape:
            raise ValueError(f"variance_noise {tuple(variance_noise.shape)} does not match the latents {tuple(mean.shape)}")
        else:
            noise = variance_noise.float()
        prev_sample = mean.detach() + std.view(-1, *([1] * (mean.dim() - 1))) * noise
    else:
        if prev_sample.shape != mean.shape:
            raise ValueError(f"prev_sample {tuple(prev_sample.shape)} does not match the latents {tuple(mean.shape)}")
        prev_sample = prev_sample.detach().float()
    log_prob = gaussian_logprob(prev_sample, mean, std, granularity)
    return DDIMStepOutput(prev_sample=prev_sample, log_prob=log_prob, mean=mean, std=std)
