"""The ``triton`` backend: Triton kernels of the four normalised ops of :mod:`pxpo_ext.reference`.

Importing this module never fails for want of triton: :func:`check_available` (called by
:mod:`pxpo_ext._backend` right after import) says why the backend cannot run. The kernels are
in :mod:`pxpo_ext.triton_kernels`, registered as ``torch.ops.pxpo_triton.*``. They compute in
float32 and read float32, float16 and bfloat16 latents; float64 inputs (used for gradcheck)
go to the float64 reference instead, since the kernels would silently drop precision.
"""
from __future__ import annotations

import os

import torch

from . import reference
from ._backend import BackendUnavailable

try:
    from .triton_kernels import library as _lib
    from .triton_kernels.launch import INTERPRETED as _INTERPRETED
except ModuleNotFoundError as e:  # only a missing triton is an expected failure
    if not (e.name or "").split(".")[0] == "triton":
        raise
    _lib = None
    _IMPORT_ERROR = str(e)


def check_available() -> None:
    """Raise :class:`BackendUnavailable` when the kernels cannot run here, saying why and what to do."""
    if _lib is None:
        raise BackendUnavailable(
            f"backend 'triton' needs the triton package ({_IMPORT_ERROR}); pip install triton, or choose "
            "another backend with PXPO_BACKEND=torch|cpu|cuda"
        )
    if not torch.cuda.is_available() and not _INTERPRETED:
        hint = "" if os.environ.get("TRITON_INTERPRET") != "1" else " (it was set only after the kernels were imported)"
        raise BackendUnavailable(
            "backend 'triton' needs a CUDA GPU, or TRITON_INTERPRET=1 in the environment before pxpo_ext is "
            f"imported to run the kernels on CPU with triton's (slow) interpreter{hint}"
        )


def _float64(t: torch.Tensor) -> bool:
    return t.dtype == torch.float64


def gaussian_logprob(x, mean, std, granularity: int):
    if _float64(mean):
        return reference.gaussian_logprob(x, mean, std, granularity)
    return torch.ops.pxpo_triton.gaussian_logprob(x, mean, std, granularity)


def reward_to_latent(reward, weight, h: int, w: int):
    if _float64(reward):
        return reference.reward_to_latent(reward, weight, h, w)
    return torch.ops.pxpo_triton.reward_to_latent(reward, weight, h, w)


def pxpo_loss(x, mean, std, logp_old, adv, weight, clip_range: float, granularity: int, loss_type: int):
    if _float64(mean):
        return reference.pxpo_loss(x, mean, std, logp_old, adv, weight, clip_range, granularity, loss_type)
    loss, _, stats = torch.ops.pxpo_triton.pxpo_loss(x, mean, std, logp_old, adv, weight, clip_range, granularity,
                                                     loss_type)
    return loss, stats


def pxpo_loss_and_grad(x, mean, std, logp_old, adv, weight, clip_range: float, granularity: int, loss_type: int):
    if _float64(mean):
        return reference.pxpo_loss_and_grad(x, mean, std, logp_old, adv, weight, clip_range, granularity, loss_type)
    return torch.ops.pxpo_triton.pxpo_loss_and_grad(x, mean, std, logp_old, adv, weight, clip_range, granularity,
                                                    loss_type)
