"""Public ops: argument checks, normalisation to the backends' common form, and dispatch.

Every function here validates its inputs on the host (shapes, dtypes, devices: no device
synchronisation), converts the user's friendly arguments (granularity names, scalar or
per-sample ``std``, reward maps with or without a channel axis) to the normalised form of
:mod:`pxpo_ext.reference`, and calls the backend :func:`pxpo_ext._backend.select` picks.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from . import _backend, reference
from .reference import GRANULARITIES, LOSS_TYPES, MEAN

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
DEFAULT_CLIP_RANGE = 0.02  # per-pixel ratios; docs/training.md says how it was measured and chosen
DDPO_CLIP_RANGE = 1e-4  # DDPO's value for its mean-over-elements ratio


def _granularity(name: str) -> int:
    try:
        return GRANULARITIES[name]
    except (KeyError, TypeError):
        raise ValueError(f"granularity must be one of {sorted(GRANULARITIES)}, got {name!r}") from None


def _loss_type(name: str) -> int:
    try:
        return LOSS_TYPES[name]
    except (KeyError, TypeError):
        raise ValueError(f"loss_type must be one of {sorted(LOSS_TYPES)}, got {name!r}") from None


def _check_latents(x: torch.Tensor, mean: torch.Tensor, names: tuple[str, str] = ("x", "mean")) -> None:
    for label, t in zip(names, (x, mean)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{label} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{label} must be a (B, C, h, w) latent, got shape {tuple(t.shape)}")
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{label} must be a floating tensor (float16, bfloat16, float32, float64), got {t.dtype}")
    both = " and ".join(names)
    if x.shape != mean.shape:
        raise ValueError(f"{both} must have the same shape, got {tuple(x.shape)} and {tuple(mean.shape)}")
    if x.dtype != mean.dtype:
        raise TypeError(f"{both} must have the same dtype, got {x.dtype} and {mean.dtype}; cast one of them")
    if x.device != mean.device:
        raise ValueError(f"{both} must be on the same device, got {x.device} and {mean.device}")
    if x.shape[0] == 0:
        raise ValueError(f"empty batch: {both} have batch size 0")


def _std_per_sample(std, batch: int, device: torch.device) -> torch.Tensor:
    """``std`` as a float32 ``(B,)`` tensor; refuses sigma <= 0 (no density, SPEC §1)."""
    if isinstance(std, (int, float)):
        if not std > 0 or math.isinf(std):
            raise ValueError(
                f"std must be finite and > 0, got {std}: a deterministic step (eta=0, or a final step with "
                "alpha_prev=1) has no density; sample with eta > 0 and leave deterministic steps out of training"
            )
        return torch.full((batch,), float(std), dtype=torch.float32, device=device)
    if not isinstance(std, torch.Tensor):
        raise TypeError(f"std must be a float or a tensor, got {type(std).__name__}")
    _expect_device("std", std, device)
    if std.numel() == 1:
        std = std.reshape(1).expand(batch)
    elif std.numel() == batch and all(s == 1 for s in std.shape[1:]) and std.shape[0] == batch:
        std = std.reshape(batch)
    else:
        raise ValueError(f"std must be a scalar or have one value per sample ({batch}), got shape {tuple(std.shape)}")
    std = _as(std, torch.float32 if std.dtype != torch.float64 else torch.float64).contiguous()
    # On the CPU a Python scan of B values is cheaper than two reductions; a device tensor is not
    # checked here, since reading it back would make the caller wait for the device.
    if std.device.type == "cpu" and not all(0 < v < math.inf for v in std.tolist()):
        raise ValueError(
            "std must be finite and > 0 for every sample: a deterministic step (eta=0, or a final step with "
            "alpha_prev=1) has no density; sample with eta > 0 and leave deterministic steps out of training"
        )
    return std


def _expect_device(label: str, t: torch.Tensor, device, other: str = "the latents are") -> None:
    """Refuse a tensor on another device before any kernel runs (or, for reward_to_latent, a silent copy)."""
    if t.device != device:
        raise ValueError(f"{label} is on {t.device} but {other} on {device}; move them to the same device")


def _expect_shape(label: str, t: torch.Tensor, shapes: Sequence[tuple], device, what: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{label} must be a torch.Tensor, got {type(t).__name__}")
    if tuple(t.shape) not in [tuple(s) for s in shapes]:
        options = " or ".join(str(tuple(s)) for s in shapes)
        raise ValueError(f"{label} must have shape {options} ({what}), got {tuple(t.shape)}")
    _expect_device(label, t, device)
    if not t.dtype.is_floating_point:
        raise TypeError(f"{label} must be a floating tensor, got {t.dtype}")


def _aux(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Small per-pixel inputs (old log-probs, advantages, weights) in float32 (float64 stays)."""
    dt = torch.float64 if like.dtype == torch.float64 else torch.float32
    return _as(t, dt)


def _as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` detached in ``dtype``, without a call when it already is (each call costs microseconds, and
    the loss is called once per micro-step)."""
    if t.dtype == dtype and not t.requires_grad:
        return t
    return t.detach().to(dtype)


def gaussian_logprob(x: torch.Tensor, mean: torch.Tensor, std, granularity: str = "pixel") -> torch.Tensor:
    """Per-element Gaussian log-density of ``x`` under ``N(mean, std^2)``, reduced by ``granularity``.

    ``"element"`` gives ``(B, C, h, w)``, ``"pixel"`` sums the channels of each latent pixel to
    ``(B, h, w)``, ``"mean"`` is DDPO's per-image mean ``(B,)``. Float32 out for any input
    dtype; differentiable in ``mean`` (``x`` is a constant).
    """
    gran = _granularity(granularity)
    _check_latents(x, mean)
    std_b = _std_per_sample(std, x.shape[0], x.device)
    return _backend.select(x.device).gaussian_logprob(x, mean, std_b, gran)


def gaussian_kl(mean: torch.Tensor, ref_mean: torch.Tensor, std, granularity: str = "pixel") -> torch.Tensor:
    """Per-image KL ``(B,)`` of a denoising step's policy ``N(mean, std^2)`` from a reference policy's
    ``N(ref_mean, std^2)`` at the same latents (the trainer's ``train_kl_coef`` penalty toward the initial model).

    ``(mean - ref_mean)^2 / (2 std^2)`` per element, summed over channels for ``"pixel"``, and averaged
    over the granularity's units (pixels; elements for ``"element"`` and ``"mean"``). Float32 out;
    differentiable in ``mean`` (``ref_mean`` is a constant). Plain PyTorch on every device: a few
    elementwise passes beside the UNet forward the reference mean costs, so no kernel.
    """
    gran = _granularity(granularity)
    _check_latents(mean, ref_mean, ("mean", "ref_mean"))
    std_b = _std_per_sample(std, mean.shape[0], mean.device)
    return reference.gaussian_kl(mean, ref_mean, std_b, gran)


def reward_to_latent(reward, latent_size, weight: torch.Tensor | None = None, source: str = "reward"):
    """Move image-resolution reward maps to the latent grid (SPEC §3).

    ``reward``: ``(B, H, W)``, ``(B, 1, H, W)`` or per-image scalars ``(B,)`` (a constant map).
    ``weight``: optional ``(B, H, W)`` or ``(B, 1, H, W)`` map in ``[0, 1]``; 0 means no feedback.
    ``latent_size``: ``h`` or ``(h, w)``. ``source`` names the reward function in errors.
    Returns ``(reward_latent, weight_latent)``, both float32 ``(B, h, w)``.
    """
    if isinstance(latent_size, int):
        h = w = latent_size
    else:
        h, w = (int(v) for v in latent_size)
    if h <= 0 or w <= 0:
        raise ValueError(f"latent_size must be positive, got {(h, w)}")
    reward = torch.as_tensor(reward)
    if not (reward.dtype.is_floating_point or reward.dtype in (torch.int32, torch.int64, torch.uint8, torch.bool)):
        raise TypeError(f"{source} returned rewards of dtype {reward.dtype}; return a float tensor")
    if reward.dim() == 4 and reward.shape[1] == 1:
        reward = reward[:, 0]
    if reward.dim() not in (1, 3):
        raise ValueError(
            f"{source} returned rewards of shape {tuple(reward.shape)}; expected per-image scalars (B,) "
            "or maps (B, H, W) / (B, 1, H, W)"
        )
    if reward.shape[0] == 0:
        raise ValueError(f"{source} returned an empty batch of rewards")
    if reward.dim() == 3 and 0 in reward.shape[1:]:  # every backend would fail or pool nothing into NaN
        raise ValueError(f"{source} returned empty reward maps of shape {tuple(reward.shape)}; return maps (B, H, W) "
                         "with H, W > 0")
    reward = reward.float() if reward.dtype != torch.float64 else reward
    if weight is not None:
        if isinstance(weight, torch.Tensor):
            _expect_device("weight", weight, reward.device, "reward is")
        weight = torch.as_tensor(weight, device=reward.device)
        if weight.dim() == 4 and weight.shape[1] == 1:
            weight = weight[:, 0]
        if weight.dim() != 3 or weight.shape[0] != reward.shape[0]:
            raise ValueError(f"{source} returned a weight map of shape {tuple(weight.shape)}; expected (B, H, W)")
        if reward.dim() == 3 and weight.shape != reward.shape:
            raise ValueError(
                f"{source} returned a weight map of shape {tuple(weight.shape)} for rewards of shape "
                f"{tuple(reward.shape)}; they must match"
            )
        weight = weight.to(reward.dtype)
    check_reward_values(reward, weight, source)
    if reward.dim() == 1:
        if weight is None:
            r = reward.reshape(-1, 1, 1).expand(-1, h, w).contiguous()
            return r, torch.ones_like(r)
        reward = reward.reshape(-1, 1, 1).expand_as(weight)
    reward = reward.contiguous()
    weight = weight.contiguous() if weight is not None else None
    return _backend.select(reward.device).reward_to_latent(reward, weight, h, w)


def check_reward_values(reward: torch.Tensor, weight: torch.Tensor | None, source: str,
                        error: type[ValueError] = ValueError) -> None:
    """Refuse NaN or infinite rewards and weights outside [0, 1] with ``error`` naming ``source``.

    Reads each map once and waits for the device once: the sum of a map is finite exactly when
    every value is (short of an overflow of the sum itself), and NaN propagates through min/max.
    """
    checks = [reward.sum()]
    if weight is not None:
        checks.extend(torch.aminmax(weight))
    total, *bounds = torch.stack(checks).tolist()
    if not math.isfinite(total):
        raise error(f"{source} returned rewards with NaN or infinity (shape {tuple(reward.shape)})")
    if bounds and not (0 <= bounds[0] and bounds[1] <= 1):  # NaN fails both comparisons
        kind = "NaN or infinity" if not all(map(math.isfinite, bounds)) else "weights outside [0, 1]"
        raise error(f"{source} returned a weight map with {kind} (min {bounds[0]:g}, max {bounds[1]:g})")


def _loss_args(x, mean, std, logp_old, advantages, weight, clip_range, granularity, loss_type):
    gran = _granularity(granularity)
    kind = _loss_type(loss_type)
    _check_latents(x, mean)
    b, c, h, w = x.shape
    std_b = _std_per_sample(std, b, x.device)
    if kind == LOSS_TYPES["ppo"] and not (isinstance(clip_range, (int, float)) and clip_range > 0):
        raise ValueError(f"clip_range must be a number > 0, got {clip_range!r}")
    if gran == MEAN:
        _expect_shape("logp_old", logp_old, [(b,)], x.device, "one per image for DDPO's mean log-prob")
        _expect_shape("advantages", advantages, [(b,)], x.device, "one per image")
        if weight is not None:
            raise ValueError("DDPO's per-image loss (granularity 'mean') takes no weight map")
    elif gran == GRANULARITIES["pixel"]:
        _expect_shape("logp_old", logp_old, [(b, h, w)], x.device, "one per latent pixel")
        _expect_shape("advantages", advantages, [(b, h, w)], x.device, "one per latent pixel")
    else:
        _expect_shape("logp_old", logp_old, [(b, c, h, w)], x.device, "one per latent element")
        _expect_shape("advantages", advantages, [(b, h, w), (b, c, h, w)], x.device, "per pixel or per element")
    if weight is not None:
        _expect_shape("weight", weight, [(b, h, w)], x.device, "one per latent pixel")
        weight = _aux(weight, x).contiguous()
    return (x, mean, std_b, _aux(logp_old, x).contiguous(), _aux(advantages, x).contiguous(), weight,
            float(clip_range), gran, kind)


def pxpo_loss(x_prev, mean, std, logp_old, advantages, weight=None, clip_range: float = DEFAULT_CLIP_RANGE,
              granularity: str = "pixel", loss_type: str = "ppo"):
    """The PXPO loss of SPEC §5 for one minibatch at one timestep.

    ``x_prev``: the sampled next latents (constant); ``mean``: the DDIM mean under the current
    weights (differentiable); ``std``: scalar or ``(B,)``; ``logp_old``: log-probs stored at
    sampling, shaped by ``granularity``; ``advantages``: ``(B, h, w)`` (or ``(B, C, h, w)`` for
    ``"element"``, ``(B,)`` for ``"mean"``); ``weight``: optional ``(B, h, w)`` latent weights.
    Returns ``(loss, stats)`` with ``stats["approx_kl"]``, ``stats["clipfrac"]`` and ``stats["skipped"]``
    as 0-dim tensors (on the latents' device: reading them waits for it). ``skipped`` counts the units
    (elements, pixels or images, by ``granularity``) whose log-ratio ``logp - logp_old`` is NaN, infinite
    or beyond ``reference.LOG_RATIO_LIMIT`` in size; they add nothing to the loss, the gradient or the
    other statistics. One fused pass computes the loss and the gradient into ``mean``; backward scales it.
    """
    args = _loss_args(x_prev, mean, std, logp_old, advantages, weight, clip_range, granularity, loss_type)
    loss, stats = _backend.select(x_prev.device).pxpo_loss(*args)
    return loss, _stats_dict(stats)


def pxpo_loss_and_grad(x_prev, mean, std, logp_old, advantages, weight=None, clip_range: float = DEFAULT_CLIP_RANGE,
                       granularity: str = "pixel", loss_type: str = "ppo"):
    """Like :func:`pxpo_loss`, but returns ``(loss, grad_mean, stats)`` without autograd.

    ``grad_mean`` is dL/d``mean`` in ``mean``'s dtype; push it into the model with
    ``mean.backward(grad_mean)``. This is the trainer's fast path: one kernel, no graph.
    """
    if isinstance(mean, torch.Tensor) and mean.requires_grad:  # no graph: the gradient is an output
        mean = mean.detach()
    args = _loss_args(x_prev, mean, std, logp_old, advantages, weight, clip_range, granularity, loss_type)
    loss, grad, stats = _backend.select(x_prev.device).pxpo_loss_and_grad(*args)
    return loss, grad, _stats_dict(stats)


def _stats_dict(stats: torch.Tensor) -> dict:
    """The backends' ``[approx_kl, clipfrac, skipped]`` as named 0-dim views (no copy, no device wait)."""
    return {"approx_kl": stats[0], "clipfrac": stats[1], "skipped": stats[2]}


def ddpo_loss(x_prev, mean, std, logp_old, advantages, clip_range: float = DDPO_CLIP_RANGE, loss_type: str = "ppo"):
    """DDPO's per-image loss: mean log-prob over all latent elements, one ratio per image.

    The same code path as :func:`pxpo_loss` with ``granularity="mean"``, so the two compare on
    equal terms. ``logp_old`` and ``advantages`` are ``(B,)``; ``stats["skipped"]`` counts images.
    """
    return pxpo_loss(x_prev, mean, std, logp_old, advantages, None, clip_range, "mean", loss_type)
