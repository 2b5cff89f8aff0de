"""Pure-PyTorch reference of every pxpo formula (SPEC §1-5).

This module is the single source of the maths: it is the CPU fallback (backend ``torch``)
and the oracle every native and Triton kernel is tested against. It is written for
clarity with autograd, never for speed. All arithmetic is float32 (float64 inputs stay
float64 so that ``gradcheck`` works).

Conventions shared by every backend (the ``normalised`` form that ``pxpo_ext.ops`` passes):

- ``x``, ``mean``: ``(B, C, h, w)`` latents, same dtype.
- ``std``: ``(B,)`` per-sample sigma, strictly positive.
- ``granularity``: ``ELEMENT`` (one value per ``(c, i, j)``), ``PIXEL`` (sum over ``c``),
  ``MEAN`` (DDPO: mean over ``(c, i, j)``).
- ``loss_type``: ``PPO`` (clipped ratio) or ``SF`` (score function, no ratio).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

ELEMENT, PIXEL, MEAN = 0, 1, 2
GRANULARITIES = {"element": ELEMENT, "pixel": PIXEL, "mean": MEAN}
PPO, SF = 0, 1
LOSS_TYPES = {"ppo": PPO, "sf": SF}

# A unit whose log-ratio d = logp - logp_old has |d| > LOG_RATIO_LIMIT, or is NaN or infinite (an fp16
# overflow in the model, a corrupt logp_old), is skipped: no loss, no gradient, no statistics, and counted
# in stats[2]. exp(20) ~ 4.9e8 leaves float32 (max ~3.4e38, exp overflows past d ~ 88.7) about 29 orders
# of magnitude of headroom for A * exp(d) and the gradient's 1 / (sigma^2 * sum w) factors, while a policy
# that moved one unit's probability by e^20 carries no usable signal (PPO clips at 1 +- eps long before).
# Every backend reads this value: csrc/pxpo_math.h (kLogRatioLimit) mirrors it, Triton imports it.
LOG_RATIO_LIMIT = 20.0

_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def gaussian_logprob(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, granularity: int) -> torch.Tensor:
    """Log-density of ``x`` under ``N(mean, std^2)`` (SPEC §1-2), reduced to ``granularity``.

    Shapes out: ``(B, C, h, w)`` for ELEMENT, ``(B, h, w)`` for PIXEL, ``(B,)`` for MEAN.
    ``x`` is treated as a constant; gradients flow into ``mean`` only.
    """
    dt = _compute_dtype(mean)
    x = x.detach().to(dt)
    mean = mean.to(dt)
    std = std.to(dt).reshape(-1, *([1] * (mean.dim() - 1)))
    lp = -((x - mean) ** 2) / (2 * std**2) - torch.log(std) - _HALF_LOG_2PI
    if granularity == ELEMENT:
        return lp
    if granularity == PIXEL:
        return lp.sum(dim=1)
    if granularity == MEAN:
        return lp.mean(dim=tuple(range(1, lp.dim())))
    raise ValueError(f"unknown granularity code {granularity}")


def gaussian_kl(mean: torch.Tensor, ref_mean: torch.Tensor, std: torch.Tensor, granularity: int) -> torch.Tensor:
    """Per-image KL of one denoising step's policy ``N(mean, std^2)`` from a reference ``N(ref_mean, std^2)``.

    Both policies share sigma (it comes from the schedule), so the KL is symmetric:
    ``(mean - ref_mean)^2 / (2 std^2)`` per element, in the units of ``granularity``'s log-prob
    (summed over channels for PIXEL) and averaged over those units: ``(B,)``, so that a KL weight
    means the same at any latent size. ``ref_mean`` is a constant; gradients flow into ``mean``.
    """
    dt = _compute_dtype(mean)
    diff = mean.to(dt) - ref_mean.detach().to(dt)
    kl = diff**2 / (2 * std.to(dt).reshape(-1, *([1] * (mean.dim() - 1))) ** 2)
    if granularity == PIXEL:
        kl = kl.sum(dim=1)
    elif granularity not in (ELEMENT, MEAN):
        raise ValueError(f"unknown granularity code {granularity}")
    return kl.mean(dim=tuple(range(1, kl.dim())))


def reward_to_latent(reward: torch.Tensor, weight: torch.Tensor | None, h: int, w: int):
    """Weighted adaptive-average pooling of ``(B, H, W)`` reward maps to ``(B, h, w)`` (SPEC §3).

    ``r = pool(W * R) / pool(W)`` (0 where the block has no weight), ``w = pool(W)``.
    Adaptive pooling is a mean over each block, so the ratio equals the sums' ratio.
    """
    dt = _compute_dtype(reward)
    reward = reward.to(dt)
    if weight is None:
        r = F.adaptive_avg_pool2d(reward.unsqueeze(1), (h, w)).squeeze(1)
        return r, torch.ones_like(r)
    weight = weight.to(dt)
    num = F.adaptive_avg_pool2d((weight * reward).unsqueeze(1), (h, w)).squeeze(1)
    den = F.adaptive_avg_pool2d(weight.unsqueeze(1), (h, w)).squeeze(1)
    r = torch.where(den > 0, num / torch.where(den > 0, den, torch.ones_like(den)), torch.zeros_like(num))
    return r, den


def _unit_weights(weight: torch.Tensor | None, logp: torch.Tensor, granularity: int) -> torch.Tensor:
    """Weight of every unit (element, pixel or image) in the shape of ``logp``."""
    if granularity == MEAN:
        if weight is not None:
            raise ValueError("granularity 'mean' (DDPO) takes no weight map")
        return torch.ones_like(logp)
    if weight is None:
        return torch.ones_like(logp)
    weight = weight.to(logp.dtype)
    return weight.unsqueeze(1).expand_as(logp) if granularity == ELEMENT else weight


def _unit_advantages(adv: torch.Tensor, logp: torch.Tensor, granularity: int) -> torch.Tensor:
    adv = adv.to(logp.dtype)
    if granularity == ELEMENT and adv.dim() == logp.dim() - 1:
        return adv.unsqueeze(1).expand_as(logp)  # a location's advantage, shared by its channels
    return adv


def _per_element(units: torch.Tensor, granularity: int) -> torch.Tensor:
    """A per-unit tensor, broadcastable against the ``(B, C, h, w)`` latents."""
    if granularity == MEAN:
        return units.reshape(-1, 1, 1, 1)
    return units.unsqueeze(1) if granularity == PIXEL else units


def kept_units(log_ratio: torch.Tensor) -> torch.Tensor:
    """Units the loss uses: ``|d| <= LOG_RATIO_LIMIT``, which is False for NaN and +-inf as well."""
    return log_ratio.abs() <= LOG_RATIO_LIMIT


def pxpo_loss(x, mean, std, logp_old, adv, weight, clip_range: float, granularity: int, loss_type: int):
    """The PXPO loss (SPEC §5), differentiable in ``mean`` through autograd.

    Returns ``(loss, stats)``: a 0-dim loss and ``stats = [approx_kl, clipfrac, skipped]``. Units
    outside :func:`kept_units` add 0 to the loss numerators, the gradient and the statistics (the
    per-image weight sums keep them) and ``skipped`` counts them, unweighted. With
    ``granularity=MEAN`` this is exactly DDPO's per-image clipped loss.
    """
    logp_old = logp_old.to(_compute_dtype(mean))
    with torch.no_grad():
        keep = kept_units(gaussian_logprob(x, mean, std, granularity) - logp_old)
    # Skipped units read mean = x, so that nothing non-finite enters the graph: autograd's backward
    # would turn a zero incoming gradient times a NaN or infinite local derivative into NaN.
    logp = gaussian_logprob(x, torch.where(_per_element(keep, granularity), mean, x.detach().to(mean.dtype)), std,
                            granularity)
    wts = _unit_weights(weight, logp, granularity)
    a = _unit_advantages(adv, logp, granularity)
    batch = logp.shape[0]
    per_image = tuple(range(1, logp.dim()))
    wsum_b = wts.sum(dim=per_image) if per_image else wts
    safe_wsum_b = torch.where(wsum_b > 0, wsum_b, torch.ones_like(wsum_b))
    dl = torch.where(keep, logp - logp_old, torch.zeros_like(logp))
    if loss_type == PPO:
        ratio = torch.exp(dl)
        unclipped = -a * ratio
        clipped = -a * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
        term = torch.maximum(unclipped, clipped)
    elif loss_type == SF:
        ratio = torch.exp(dl.detach())
        term = -a * logp
    else:
        raise ValueError(f"unknown loss_type code {loss_type}")
    term = torch.where(keep, term, torch.zeros_like(term))
    num_b = (wts * term).sum(dim=per_image) if per_image else wts * term
    loss = (num_b / safe_wsum_b).sum() / batch
    with torch.no_grad():
        total_w = wts.sum()
        safe_total = torch.where(total_w > 0, total_w, torch.ones_like(total_w))
        approx_kl = 0.5 * (wts * dl.detach() ** 2).sum() / safe_total
        outside = keep & ((ratio.detach() - 1.0).abs() > clip_range)
        clipfrac = (wts * outside.to(wts.dtype)).sum() / safe_total
        skipped = (~keep).sum().to(loss.dtype)
    return loss, torch.stack([approx_kl, clipfrac, skipped])


def pxpo_loss_and_grad(x, mean, std, logp_old, adv, weight, clip_range: float, granularity: int, loss_type: int):
    """Loss, its gradient with respect to ``mean`` (in ``mean``'s dtype) and ``stats``, as :func:`pxpo_loss`.

    The contract of every backend's fused kernel, derived here by autograd from ``pxpo_loss``.
    """
    with torch.enable_grad():
        m = mean.detach().requires_grad_(True)
        loss, stats = pxpo_loss(x, m, std, logp_old, adv, weight, clip_range, granularity, loss_type)
        (grad,) = torch.autograd.grad(loss, m)
    return loss.detach(), grad.to(mean.dtype), stats
