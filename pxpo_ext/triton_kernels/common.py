"""``@triton.jit`` helpers shared by the kernels: latent tile addressing and the per-unit maths.

The formulas are those of :mod:`pxpo_ext.reference` (SPEC §1, §5), evaluated in float32.
"""
import math

import triton
import triton.language as tl

from .. import reference

HALF_LOG_2PI = tl.constexpr(0.5 * math.log(2.0 * math.pi))  # jit code reads only constexpr globals
LOG_RATIO_LIMIT = tl.constexpr(reference.LOG_RATIO_LIMIT)  # the reference says why 20

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
    """Per-unit loss term, its derivative with respect to ``lp``, the log-ratio, the clip flag and the kept flag.

    PPO takes the larger of the unclipped and clipped terms; the gradient flows where the
    unclipped one is >= the clipped one (a ratio exactly at ``1 +- eps`` counts as unclipped).
    A unit with ``|lp - lp_old| > LOG_RATIO_LIMIT``, NaN or infinite is skipped (``kept`` False):
    every other output is 0, by selects, since 0 * NaN is NaN.
    """
    dl = lp - lp_old
    kept = tl.abs(dl) <= LOG_RATIO_LIMIT  # one compare: False for NaN too
    dl = tl.where(kept, dl, 0.0)
    ratio = tl.exp(dl)
    if LOSS_TYPE == 0:
        unclipped = -adv * ratio
        clipped = -adv * tl.minimum(tl.maximum(ratio, lo), hi)
        term = tl.maximum(unclipped, clipped)
        dterm = tl.where(unclipped >= clipped, unclipped, 0.0)
    else:
        term = -adv * lp
        dterm = -adv
    is_clipped = kept & (tl.abs(ratio - 1.0) > eps)
    return tl.where(kept, term, 0.0), tl.where(kept, dterm, 0.0), dl, is_clipped, kept


@triton.jit
def mean_grad(g, d):
    """``g * d`` for an element's ``dL/dmean``, but 0 where the unit's factor ``g`` is 0: a skipped unit's
    ``d = x - mean`` may be NaN or infinite."""
    return tl.where(g == 0.0, 0.0, g * d)
