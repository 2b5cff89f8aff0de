"""``@triton.jit`` helpers shared by the kernels: latent tile addressing and the per-unit maths.

The formulas are those of :mod:`pxpo_ext.reference` (SPEC §1, §5), evaluated in float32.
"""
import math

import triton
import triton.language as tl

HALF_LOG_2PI = tl.constexpr(0.5 * math.log(2.0 * math.pi))  # jit code reads only constexpr globals

ELEMENT, PIXEL, MEAN = 0, 1, 2  # granularity codes of pxpo_ext.reference
PPO, SF = 0, 1  # loss-type codes of pxpo_ext.reference


@triton.jit
def tile_offsets(b64, offs_c, offs_p, W, s_b, s_c, s_h, s_w, FLAT: tl.constexpr):
    """Element offsets of a ``(BLOCK_C, BLOCK_P)`` tile of one image of a strided ``(B, C, h, w)`` latent.

    ``FLAT``: the ``(h, w)`` plane is contiguous, so pixels are consecutive in memory and the
    compiler can vectorise the loads; otherwise pixel ``p`` is split into row and column.
    """
    if FLAT:
        return b64 * s_b + offs_c[:, None] * s_c + offs_p[None, :]
    i = offs_p // W
    j = offs_p - i * W
    return b64 * s_b + offs_c[:, None] * s_c + i[None, :] * s_h + j[None, :] * s_w


@triton.jit
def element_logprob(d, var, log_std):
    """Per-element Gaussian log-density from ``d = x - mean``, in the reference's order of operations."""
    return -(d * d) / (2.0 * var) - log_std - HALF_LOG_2PI


@triton.jit
def ppo_terms(lp, lp_old, adv, lo, hi, eps, LOSS_TYPE: tl.constexpr):
    """Per-unit loss term, its derivative with respect to ``lp``, the log-ratio and the clip flag.

    PPO takes the larger of the unclipped and clipped terms; the gradient flows where the
    unclipped one is >= the clipped one (a ratio exactly at ``1 +- eps`` counts as unclipped).
    """
    dl = lp - lp_old
    ratio = tl.exp(dl)
    if LOSS_TYPE == 0:
        unclipped = -adv * ratio
        clipped = -adv * tl.minimum(tl.maximum(ratio, lo), hi)
        term = tl.maximum(unclipped, clipped)
        dterm = tl.where(unclipped >= clipped, unclipped, 0.0)
    else:
        term = -adv * lp
        dterm = -adv
    is_clipped = tl.abs(ratio - 1.0) > eps
    return term, dterm, dl, is_clipped
