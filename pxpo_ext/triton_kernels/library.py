"""The Triton kernels as ``torch.library`` operators ``pxpo_triton::*`` (``triton_op`` + ``wrap_triton``).

``triton_op`` makes each launcher visible to torch.compile (no graph break, the kernels can be
inlined by Inductor) and gives a fake implementation for free: the launchers only allocate
outputs and launch. Autograd is registered per op; the loss op's backward scales the gradient
its forward already computed.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .launch import INTERPRETED
from .logprob import logprob_backward, logprob_forward
from .loss import loss_and_grad
from .pooling import pool_rewards


@torch.library.triton_op("pxpo_triton::gaussian_logprob", mutates_args=())
def gaussian_logprob(x: Tensor, mean: Tensor, std: Tensor, granularity: int) -> Tensor:
    return logprob_forward(x, mean, std, granularity)


@torch.library.triton_op("pxpo_triton::gaussian_logprob_backward", mutates_args=())
def gaussian_logprob_backward(x: Tensor, mean: Tensor, std: Tensor, grad_out: Tensor, granularity: int) -> Tensor:
    return logprob_backward(x, mean, std, grad_out, granularity)


def _logprob_setup(ctx, inputs, output):
    x, mean, std, granularity = inputs
    ctx.save_for_backward(x, mean, std)
    ctx.granularity = granularity


def _logprob_backward(ctx, grad_out):
    x, mean, std = ctx.saved_tensors
    grad_mean = gaussian_logprob_backward(x, mean, std, grad_out, ctx.granularity) if ctx.needs_input_grad[1] else None
    return None, grad_mean, None, None  # x is a constant sample, std a schedule constant


gaussian_logprob.register_autograd(_logprob_backward, setup_context=_logprob_setup)


@torch.library.triton_op("pxpo_triton::reward_to_latent", mutates_args=())
def reward_to_latent(reward: Tensor, weight: Optional[Tensor], h: int, w: int) -> tuple[Tensor, Tensor]:
    return pool_rewards(reward, weight, h, w)


@torch.library.triton_op("pxpo_triton::pxpo_loss", mutates_args=())
def pxpo_loss(x: Tensor, mean: Tensor, std: Tensor, logp_old: Tensor, adv: Tensor, weight: Optional[Tensor],
              clip_range: float, granularity: int, loss_type: int) -> tuple[Tensor, Tensor, Tensor]:
    """``(loss, dL/dmean, [approx_kl, clipfrac, skipped])`` from the fused kernel."""
    return loss_and_grad(x, mean, std, logp_old, adv, weight, clip_range, granularity, loss_type)


@torch.library.triton_op("pxpo_triton::pxpo_loss_and_grad", mutates_args=())
def pxpo_loss_and_grad(x: Tensor, mean: Tensor, std: Tensor, logp_old: Tensor, adv: Tensor, weight: Optional[Tensor],
                       clip_range: float, granularity: int, loss_type: int) -> tuple[Tensor, Tensor, Tensor]:
    """The same kernel without an autograd formula: the fast path skips the autograd layer."""
    return loss_and_grad(x, mean, std, logp_old, adv, weight, clip_range, granularity, loss_type)


def _loss_setup(ctx, inputs, output):
    _, grad, stats = output
    ctx.save_for_backward(grad)
    ctx.mark_non_differentiable(grad, stats)


def _loss_backward(ctx, grad_loss, _grad_grad, _grad_stats):
    (grad,) = ctx.saved_tensors
    grad_mean = grad * grad_loss if ctx.needs_input_grad[1] else None
    return None, grad_mean, None, None, None, None, None, None, None


pxpo_loss.register_autograd(_loss_backward, setup_context=_loss_setup)


def _opaque_under_functionalization(mode, func, types, args, kwargs):
    return mode.__torch_dispatch__(func, types, args, kwargs)


if INTERPRETED:
    # triton_op decomposes each op into its kernel launches when AOTAutograd functionalizes a
    # graph; interpreted kernels cannot be captured that way (wrap_triton returns them bare), so
    # under TRITON_INTERPRET=1 the ops stay whole in compiled graphs, as torch.export keeps them.
    from torch._subclasses.functional_tensor import FunctionalTensorMode

    for _op in (gaussian_logprob, gaussian_logprob_backward, reward_to_latent, pxpo_loss, pxpo_loss_and_grad):
        _op.register_torch_dispatch(FunctionalTensorMode, _opaque_under_functionalization)
