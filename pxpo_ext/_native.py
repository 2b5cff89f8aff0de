"""The ``cpu`` and ``cuda`` backends: the C++/CUDA extension ``pxpo_ext._C``.

``import pxpo_ext._C`` registers the operators ``torch.ops.pxpo.*`` (schemas in
``csrc/pxpo_ops.cpp``, kernels in ``csrc/cpu`` and ``csrc/cuda``; the dispatcher picks the
kernel from the tensors' device; the autograd formulas of ``gaussian_logprob`` and
``pxpo_loss`` are C++ too, in ``csrc/autograd.cpp``, so that a call needing no gradient pays
no Python wrapper). :func:`load` imports it on first use and then adds, once, what
torch.compile needs: a fake (meta) kernel for every op.

The four backend functions take the normalised arguments of :mod:`pxpo_ext.reference`.
"""
from __future__ import annotations

import importlib
import threading

import torch

from ._backend import BackendUnavailable
from .reference import ELEMENT, MEAN, PIXEL

_lock = threading.Lock()
_C = None


def load():
    """The extension module, imported and registered once; raises :class:`BackendUnavailable`."""
    global _C
    if _C is not None:
        return _C
    with _lock:
        if _C is None:
            try:
                module = importlib.import_module("pxpo_ext._C")
            except ImportError as e:  # not built, or built against another torch
                raise BackendUnavailable(
                    f"pxpo_ext._C is not built or does not load ({e}): run `pip install --no-build-isolation -e .` "
                    "in the pxpo checkout with the torch you use installed (docs/build.md), or choose "
                    "PXPO_BACKEND=torch"
                ) from e
            _register_python_parts()
            _C = module
    return _C


def has_cuda() -> bool:
    """Whether the extension was compiled with its CUDA kernels."""
    return bool(load().has_cuda())


def build_info() -> dict:
    """Version, compiler, OpenMP, CUDA and torch version of the build."""
    return dict(load().build_info())


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _unit_shape(x: torch.Tensor, granularity: int) -> tuple:
    b, c, h, w = x.shape
    shapes = {ELEMENT: (b, c, h, w), PIXEL: (b, h, w), MEAN: (b,)}
    if granularity not in shapes:
        raise ValueError(f"granularity code must be 0 (element), 1 (pixel) or 2 (mean), got {granularity}")
    return shapes[granularity]


def _register_python_parts() -> None:
    """Fake kernels for torch.compile; called once, right after ``_C`` is imported."""
    lib = "pxpo::"

    @torch.library.register_fake(lib + "gaussian_logprob")
    def _(x, mean, std, granularity):
        torch._check(x.shape == mean.shape, lambda: "x and mean must have the same shape")
        return x.new_empty(_unit_shape(x, granularity), dtype=_compute_dtype(x))

    @torch.library.register_fake(lib + "gaussian_logprob_backward")
    def _(grad, x, mean, std, granularity):
        return torch.empty_like(mean, memory_format=torch.contiguous_format)

    @torch.library.register_fake(lib + "reward_to_latent")
    def _(reward, weight, h, w):
        shape = (reward.shape[0], h, w)
        dtype = _compute_dtype(reward)
        return reward.new_empty(shape, dtype=dtype), reward.new_empty(shape, dtype=dtype)

    def loss_fake(x, mean, std, logp_old, adv, weight, clip_range, granularity, loss_type):
        dtype = _compute_dtype(x)
        grad = torch.empty_like(mean, memory_format=torch.contiguous_format)
        return x.new_empty((), dtype=dtype), grad, x.new_empty((3,), dtype=dtype)  # [approx_kl, clipfrac, skipped]

    torch.library.register_fake(lib + "pxpo_loss", loss_fake)
    torch.library.register_fake(lib + "pxpo_loss_and_grad", loss_fake)


def _ops():
    load()
    return torch.ops.pxpo


def gaussian_logprob(x, mean, std, granularity: int):
    return _ops().gaussian_logprob(x, mean, std, granularity)


def reward_to_latent(reward, weight, h: int, w: int):
    r, wl = _ops().reward_to_latent(reward, weight, h, w)
    return r, wl


def pxpo_loss(x, mean, std, logp_old, adv, weight, clip_range: float, granularity: int, loss_type: int):
    loss, _, stats = _ops().pxpo_loss(x, mean, std, logp_old, adv, weight, clip_range, granularity, loss_type)
    return loss, stats


def pxpo_loss_and_grad(x, mean, std, logp_old, adv, weight, clip_range: float, granularity: int, loss_type: int):
    return tuple(_ops().pxpo_loss_and_grad(x, mean, std, logp_old, adv, weight, clip_range, granularity, loss_type))
