"""pxpo: reinforcement learning from per-pixel feedback for diffusion models (PXPO, arXiv 2404.04356).

The ops (:mod:`pxpo_ext.ops`) have four backends: a pure-PyTorch reference, C++ CPU kernels,
CUDA kernels and Triton kernels (:mod:`pxpo_ext._backend`). Importing this package needs no
compiler, no CUDA and no triton; native code loads on first use.
"""
from ._backend import BackendUnavailable, use_backend
from ._backend import info as backend_info
from .ddim import DDIMStepOutput, ddim_mean_and_std, ddim_sigmas, ddim_step_with_logprob
from .ops import ddpo_loss, gaussian_kl, gaussian_logprob, pxpo_loss, pxpo_loss_and_grad, reward_to_latent

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailable",
    "DDIMStepOutput",
    "backend_info",
    "ddim_mean_and_std",
    "ddim_sigmas",
    "ddim_step_with_logprob",
    "ddpo_loss",
    "gaussian_kl",
    "gaussian_logprob",
    "pxpo_loss",
    "pxpo_loss_and_grad",
    "reward_to_latent",
    "use_backend",
]
