"""The fused PXPO loss (SPEC §5): loss, statistics and ``dL/dmean`` from one read of the latents.

Launches per call: two.

1. The main kernel. Pixel/element granularity: program ``(b, s)`` loads its first pixel block,
   sums image ``b``'s weights meanwhile (the per-image normaliser the gradient needs; a ``(h, w)``
   float32 row, cheap next to the ``(C, h, w)`` latents), then walks its pixel blocks: log-prob, ratio, clipped term,
   ``dL/dmean`` stored in ``mean``'s dtype, and five per-program partial sums (loss, weighted
   squared log-ratio, weighted clip count, skipped units, weight). Mean granularity (DDPO): one program per
   image, which needs the whole image's log-prob before any gradient: a reduction loop, then
   a gradient loop (the second read of the image hits L2).
2. ``_finalize_kernel``: one program sums the partials in a fixed order, so the result is
   bitwise reproducible run to run (no atomics).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import ELEMENT, MEAN, element_logprob, mean_grad, ppo_terms, tile_offsets
from .launch import launch, num_warps, plane_is_flat, split_per_image, tile_shape


@triton.jit
def _load_tile(x_ptr, mean_ptr, lpo_ptr, adv_ptr, weight_ptr, b64, offs_c, mask_c, p0, C, W, HW,
               sxb, sxc, sxh, sxw, smb, smc, smh, smw, GRAN: tl.constexpr, HAS_WEIGHT: tl.constexpr,
               ADV_PER_ELEMENT: tl.constexpr, X_FLAT: tl.constexpr, M_FLAT: tl.constexpr, BLOCK_P: tl.constexpr):
    """One ``(BLOCK_C, BLOCK_P)`` tile's inputs: ``x``, ``mean``, the pixels' weights, old log-probs and advantages."""
    offs_p = tl.multiple_of(p0, BLOCK_P) + tl.arange(0, BLOCK_P)
    mask_p = offs_p < HW
    mask = mask_c[:, None] & mask_p[None, :]
    x = tl.load(x_ptr + tile_offsets(b64, offs_c, offs_p, W, sxb, sxc, sxh, sxw, X_FLAT), mask=mask, other=0.0)
    m = tl.load(mean_ptr + tile_offsets(b64, offs_c, offs_p, W, smb, smc, smh, smw, M_FLAT), mask=mask, other=0.0)
    pix = b64 * HW + offs_p
    elem = b64 * C * HW + offs_c[:, None] * HW + offs_p[None, :]
    if HAS_WEIGHT:
        wt = tl.load(weight_ptr + pix, mask=mask_p, other=0.0)
    else:
        wt = tl.where(mask_p, 1.0, 0.0)
    if GRAN == 0:
        lp_old = tl.load(lpo_ptr + elem, mask=mask, other=0.0)
        if ADV_PER_ELEMENT:
            adv = tl.load(adv_ptr + elem, mask=mask, other=0.0)
        else:
            adv = tl.load(adv_ptr + pix, mask=mask_p, other=0.0)[None, :]
    else:
        lp_old = tl.load(lpo_ptr + pix, mask=mask_p, other=0.0)
        adv = tl.load(adv_ptr + pix, mask=mask_p, other=0.0)
    return x, m, wt, lp_old, adv


@triton.jit
def _tile_loss(x, m, wt, lp_old, adv, grad_ptr, b64, offs_c, mask_c, p0, C, HW, var, log_std, scale, lo, hi, eps,
               GRAN: tl.constexpr, LOSS_TYPE: tl.constexpr, BLOCK_P: tl.constexpr):
    """Stores one tile's ``dL/dmean``; returns its per-pixel sums of ``w * term``, ``w * dl^2``, ``w * [clipped]``,
    skipped units and ``w``."""
    offs_p = tl.multiple_of(p0, BLOCK_P) + tl.arange(0, BLOCK_P)
    mask_p = offs_p < HW
    mask = mask_c[:, None] & mask_p[None, :]
    d = x.to(tl.float32) - m.to(tl.float32)
    lp = tl.where(mask, element_logprob(d, var, log_std), 0.0)
    if GRAN == 0:
        wu = tl.where(mask, wt[None, :], 0.0)
        term, dterm, dl, is_clipped, kept = ppo_terms(lp, lp_old, adv, lo, hi, eps, LOSS_TYPE)
        g = dterm * wu * scale
        sums = (tl.sum(wu * term, axis=0), tl.sum(wu * dl * dl, axis=0), tl.sum(tl.where(is_clipped, wu, 0.0), axis=0),
                tl.sum(tl.where(mask & ~kept, 1.0, 0.0), axis=0), tl.sum(wu, axis=0))
    else:
        term, dterm, dl, is_clipped, kept = ppo_terms(tl.sum(lp, axis=0), lp_old, adv, lo, hi, eps, LOSS_TYPE)
        g = (dterm * wt * scale)[None, :]
        sums = (wt * term, wt * dl * dl, tl.where(is_clipped, wt, 0.0), tl.where(mask_p & ~kept, 1.0, 0.0), wt)
    elem = b64 * C * HW + offs_c[:, None] * HW + offs_p[None, :]
    tl.store(grad_ptr + elem, mean_grad(g, d / var).to(grad_ptr.dtype.element_ty), mask=mask)
    return sums


@triton.jit
def _loss_kernel(
    x_ptr, mean_ptr, std_ptr, lpo_ptr, adv_ptr, weight_ptr, grad_ptr, part_ptr,
    C, W, HW, split, num_programs, inv_batch, unweighted_norm, lo, hi, eps,
    sxb, sxc, sxh, sxw, smb, smc, smh, smw,
    GRAN: tl.constexpr, LOSS_TYPE: tl.constexpr, HAS_WEIGHT: tl.constexpr, ADV_PER_ELEMENT: tl.constexpr,
    X_FLAT: tl.constexpr, M_FLAT: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    b = tl.program_id(0)
    s = tl.program_id(1)
    b64 = b.to(tl.int64)
    offs_c = tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    # The first tile is loaded before the weight sum below so that its loads overlap the sum's
    # (at small batches each program has one tile, and the sum would otherwise cost a round trip).
    p_first = s * BLOCK_P
    x, m, wt, lp_old, adv = _load_tile(x_ptr, mean_ptr, lpo_ptr, adv_ptr, weight_ptr, b64, offs_c, mask_c, p_first,
                                       C, W, HW, sxb, sxc, sxh, sxw, smb, smc, smh, smw,
                                       GRAN, HAS_WEIGHT, ADV_PER_ELEMENT, X_FLAT, M_FLAT, BLOCK_P)
    # Per-image normaliser: sum of unit weights (C per pixel for element granularity).
    if HAS_WEIGHT:
        wacc = tl.zeros([BLOCK_C * BLOCK_P], dtype=tl.float32)
        for p0 in range(0, HW, BLOCK_C * BLOCK_P):
            offs = p0 + tl.arange(0, BLOCK_C * BLOCK_P)
            wacc += tl.load(weight_ptr + b64 * HW + offs, mask=offs < HW, other=0.0)
        norm = tl.sum(wacc)
        if GRAN == 0:
            norm = norm * C
    else:
        norm = unweighted_norm
    scale = inv_batch / tl.where(norm > 0, norm, 1.0)  # dL/d(w * term); an all-zero-weight image has no terms
    std = tl.load(std_ptr + b)
    var = std * std
    log_std = tl.log(std)
    acc_loss, acc_kl, acc_clip, acc_skip, acc_w = _tile_loss(x, m, wt, lp_old, adv, grad_ptr, b64, offs_c, mask_c,
                                                             p_first, C, HW, var, log_std, scale, lo, hi, eps,
                                                             GRAN, LOSS_TYPE, BLOCK_P)
    for p0 in range(p_first + split * BLOCK_P, HW, split * BLOCK_P):
        x, m, wt, lp_old, adv = _load_tile(x_ptr, mean_ptr, lpo_ptr, adv_ptr, weight_ptr, b64, offs_c, mask_c, p0,
                                           C, W, HW, sxb, sxc, sxh, sxw, smb, smc, smh, smw,
                                           GRAN, HAS_WEIGHT, ADV_PER_ELEMENT, X_FLAT, M_FLAT, BLOCK_P)
        t_loss, t_kl, t_clip, t_skip, t_w = _tile_loss(x, m, wt, lp_old, adv, grad_ptr, b64, offs_c, mask_c, p0,
                                                       C, HW, var, log_std, scale, lo, hi, eps,
                                                       GRAN, LOSS_TYPE, BLOCK_P)
        acc_loss += t_loss
        acc_kl += t_kl
        acc_clip += t_clip
        acc_skip += t_skip
        acc_w += t_w
    slot = b * split + s
    tl.store(part_ptr + slot, tl.sum(acc_loss) * scale)
    tl.store(part_ptr + num_programs + slot, tl.sum(acc_kl))
    tl.store(part_ptr + 2 * num_programs + slot, tl.sum(acc_clip))
    tl.store(part_ptr + 3 * num_programs + slot, tl.sum(acc_skip))
    tl.store(part_ptr + 4 * num_programs + slot, tl.sum(acc_w))


@triton.jit
def _ddpo_loss_kernel(
    x_ptr, mean_ptr, std_ptr, lpo_ptr, adv_ptr, grad_ptr, part_ptr,
    C, W, HW, num_programs, inv_batch, inv_units, lo, hi, eps,
    sxb, sxc, sxh, sxw, smb, smc, smh, smw,
    LOSS_TYPE: tl.constexpr, X_FLAT: tl.constexpr, M_FLAT: tl.constexpr, BLOCK_C: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    """Mean granularity: one program per image; the image's log-prob is a mean over (c, i, j)."""
    b = tl.program_id(0)
    b64 = b.to(tl.int64)
    offs_c = tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    std = tl.load(std_ptr + b)
    var = std * std
    log_std = tl.log(std)
    total = tl.zeros([BLOCK_P], dtype=tl.float32)
    for p0 in range(0, HW, BLOCK_P):
        offs_p = tl.multiple_of(p0, BLOCK_P) + tl.arange(0, BLOCK_P)
        mask = mask_c[:, None] & (offs_p < HW)[None, :]
        x = tl.load(x_ptr + tile_offsets(b64, offs_c, offs_p, W, sxb, sxc, sxh, sxw, X_FLAT), mask=mask, other=0.0)
        m = tl.load(mean_ptr + tile_offsets(b64, offs_c, offs_p, W, smb, smc, smh, smw, M_FLAT), mask=mask, other=0.0)
        lp = element_logprob(x.to(tl.float32) - m.to(tl.float32), var, log_std)
        total += tl.sum(tl.where(mask, lp, 0.0), axis=0)
    term, dterm, dl, is_clipped, kept = ppo_terms(tl.sum(total) * inv_units, tl.load(lpo_ptr + b),
                                                  tl.load(adv_ptr + b), lo, hi, eps, LOSS_TYPE)
    coef = tl.where(kept, dterm * inv_batch * inv_units / var, 0.0)  # 0 / var is NaN where var underflows to 0
    for p0 in range(0, HW, BLOCK_P):
        offs_p = tl.multiple_of(p0, BLOCK_P) + tl.arange(0, BLOCK_P)
        mask = mask_c[:, None] & (offs_p < HW)[None, :]
        x = tl.load(x_ptr + tile_offsets(b64, offs_c, offs_p, W, sxb, sxc, sxh, sxw, X_FLAT), mask=mask, other=0.0)
        m = tl.load(mean_ptr + tile_offsets(b64, offs_c, offs_p, W, smb, smc, smh, smw, M_FLAT), mask=mask, other=0.0)
        grad = mean_grad(coef, x.to(tl.float32) - m.to(tl.float32))
        tl.store(grad_ptr + b64 * C * HW + offs_c[:, None] * HW + offs_p[None, :],
                 grad.to(grad_ptr.dtype.element_ty), mask=mask)
    tl.store(part_ptr + b, term * inv_batch)
    tl.store(part_ptr + num_programs + b, dl * dl)
    tl.store(part_ptr + 2 * num_programs + b, tl.where(is_clipped, 1.0, 0.0))
    tl.store(part_ptr + 3 * num_programs + b, tl.where(kept, 0.0, 1.0))
    tl.store(part_ptr + 4 * num_programs + b, 1.0)


@triton.jit
def _finalize_kernel(part_ptr, loss_ptr, stats_ptr, num_programs, BLOCK: tl.constexpr):
    """loss = sum of partials; approx_kl and clipfrac are weighted means over all units of the batch,
    skipped a count."""
    acc_loss = tl.zeros([BLOCK], dtype=tl.float32)
    acc_kl = tl.zeros([BLOCK], dtype=tl.float32)
    acc_clip = tl.zeros([BLOCK], dtype=tl.float32)
    acc_skip = tl.zeros([BLOCK], dtype=tl.float32)
    acc_w = tl.zeros([BLOCK], dtype=tl.float32)
    for p0 in range(0, num_programs, BLOCK):
        offs = p0 + tl.arange(0, BLOCK)
        mask = offs < num_programs
        acc_loss += tl.load(part_ptr + offs, mask=mask, other=0.0)
        acc_kl += tl.load(part_ptr + num_programs + offs, mask=mask, other=0.0)
        acc_clip += tl.load(part_ptr + 2 * num_programs + offs, mask=mask, other=0.0)
        acc_skip += tl.load(part_ptr + 3 * num_programs + offs, mask=mask, other=0.0)
        acc_w += tl.load(part_ptr + 4 * num_programs + offs, mask=mask, other=0.0)
    total_w = tl.sum(acc_w)
    safe_w = tl.where(total_w > 0, total_w, 1.0)
    tl.store(loss_ptr, tl.sum(acc_loss))
    tl.store(stats_ptr, 0.5 * tl.sum(acc_kl) / safe_w)
    tl.store(stats_ptr + 1, tl.sum(acc_clip) / safe_w)
    tl.store(stats_ptr + 2, tl.sum(acc_skip))


def loss_and_grad(x, mean, std, logp_old, adv, weight, clip_range: float, granularity: int, loss_type: int):
    """``(loss 0-dim float32, grad (B, C, h, w) in mean's dtype, stats (3,) float32)`` in two launches.

    ``logp_old``, ``adv`` and ``weight`` are contiguous float32 in the shapes of the normalised
    form (:mod:`pxpo_ext.reference`); ``x`` and ``mean`` may be strided.
    """
    batch, channels, h, w = x.shape
    hw = h * w
    logp_old = logp_old.contiguous()
    adv = adv.contiguous()
    grad = torch.empty((batch, channels, h, w), dtype=mean.dtype, device=mean.device)
    block_c, block_p = tile_shape(channels, hw)
    bounds = (1.0 - clip_range, 1.0 + clip_range, clip_range)
    meta = dict(LOSS_TYPE=loss_type, X_FLAT=plane_is_flat(x), M_FLAT=plane_is_flat(mean), BLOCK_C=block_c,
                BLOCK_P=block_p, num_warps=num_warps(block_c * block_p))
    if granularity == MEAN:
        split = 1
        partials = torch.empty((5, batch), dtype=torch.float32, device=x.device)
        launch(_ddpo_loss_kernel, (batch,), x, mean, std, logp_old, adv, grad, partials,
               channels, w, hw, batch, 1.0 / batch, 1.0 / (channels * hw), *bounds, *x.stride(), *mean.stride(), **meta)
    else:
        split = split_per_image(batch, triton.cdiv(hw, block_p), x.device)
        partials = torch.empty((5, batch * split), dtype=torch.float32, device=x.device)
        has_weight = weight is not None
        launch(_loss_kernel, (batch, split), x, mean, std, logp_old, adv, weight.contiguous() if has_weight else adv,
               grad, partials, channels, w, hw, split, batch * split, 1.0 / batch,
               float(hw * channels if granularity == ELEMENT else hw), *bounds,
               *x.stride(), *mean.stride(),
               GRAN=granularity, HAS_WEIGHT=has_weight, ADV_PER_ELEMENT=granularity == ELEMENT and adv.dim() == 4,
               **meta)
    loss = torch.empty((), dtype=torch.float32, device=x.device)
    stats = torch.empty((3,), dtype=torch.float32, device=x.device)
    num_programs = batch * split
    launch(_finalize_kernel, (1,), partials, loss, stats, num_programs,
           BLOCK=min(1024, triton.next_power_of_2(num_programs)), num_warps=4)
    return loss, grad, stats
