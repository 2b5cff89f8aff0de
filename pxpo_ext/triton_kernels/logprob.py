"""Gaussian log-probability (SPEC §1-2): forward reduced to a granularity, and its backward.

Forward reads ``x`` and ``mean`` once and writes ``(B, C, h, w)``, ``(B, h, w)`` or ``(B,)``
float32. Backward reads them again with the incoming gradient and writes ``dL/dmean`` in
``mean``'s dtype. One launch each.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import ELEMENT, MEAN, PIXEL, element_logprob, tile_offsets
from .launch import launch, num_warps, plane_is_flat, split_per_image, tile_shape


@triton.jit
def _logprob_fwd_kernel(
    x_ptr, mean_ptr, std_ptr, out_ptr,
    C, W, HW, split, inv_units,
    sxb, sxc, sxh, sxw, smb, smc, smh, smw,
    GRAN: tl.constexpr, X_FLAT: tl.constexpr, M_FLAT: tl.constexpr, BLOCK_C: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    b = tl.program_id(0)
    s = tl.program_id(1)
    b64 = b.to(tl.int64)
    std = tl.load(std_ptr + b)
    var = std * std
    log_std = tl.log(std)
    offs_c = tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    total = tl.zeros([BLOCK_P], dtype=tl.float32)
    for p0 in range(s * BLOCK_P, HW, split * BLOCK_P):
        offs_p = tl.multiple_of(p0, BLOCK_P) + tl.arange(0, BLOCK_P)
        mask_p = offs_p < HW
        mask = mask_c[:, None] & mask_p[None, :]
        x = tl.load(x_ptr + tile_offsets(b64, offs_c, offs_p, W, sxb, sxc, sxh, sxw, X_FLAT), mask=mask, other=0.0)
        m = tl.load(mean_ptr + tile_offsets(b64, offs_c, offs_p, W, smb, smc, smh, smw, M_FLAT), mask=mask, other=0.0)
        lp = tl.where(mask, element_logprob(x.to(tl.float32) - m.to(tl.float32), var, log_std), 0.0)
        if GRAN == 0:
            tl.store(out_ptr + b64 * C * HW + offs_c[:, None] * HW + offs_p[None, :], lp, mask=mask)
        elif GRAN == 1:
            tl.store(out_ptr + b64 * HW + offs_p, tl.sum(lp, axis=0), mask=mask_p)
        else:
            total += tl.sum(lp, axis=0)
    if GRAN == 2:
        tl.store(out_ptr + b, tl.sum(total) * inv_units)


@triton.jit
def _logprob_bwd_kernel(
    x_ptr, mean_ptr, std_ptr, gout_ptr, grad_ptr,
    C, W, HW, split, inv_units,
    sxb, sxc, sxh, sxw, smb, smc, smh, smw,
    GRAN: tl.constexpr, X_FLAT: tl.constexpr, M_FLAT: tl.constexpr, BLOCK_C: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    b = tl.program_id(0)
    s = tl.program_id(1)
    b64 = b.to(tl.int64)
    std = tl.load(std_ptr + b)
    inv_var = 1.0 / (std * std)
    if GRAN == 2:  # d mean_k(l_k) / d mean = d / (var * C * HW)
        inv_var = inv_var * tl.load(gout_ptr + b) * inv_units
    offs_c = tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    for p0 in range(s * BLOCK_P, HW, split * BLOCK_P):
        offs_p = tl.multiple_of(p0, BLOCK_P) + tl.arange(0, BLOCK_P)
        mask_p = offs_p < HW
        mask = mask_c[:, None] & mask_p[None, :]
        x = tl.load(x_ptr + tile_offsets(b64, offs_c, offs_p, W, sxb, sxc, sxh, sxw, X_FLAT), mask=mask, other=0.0)
        m = tl.load(mean_ptr + tile_offsets(b64, offs_c, offs_p, W, smb, smc, smh, smw, M_FLAT), mask=mask, other=0.0)
        dlp = (x.to(tl.float32) - m.to(tl.float32)) * inv_var
        elem = b64 * C * HW + offs_c[:, None] * HW + offs_p[None, :]
        if GRAN == 0:
            dlp = dlp * tl.load(gout_ptr + elem, mask=mask, other=0.0)
        elif GRAN == 1:
            dlp = dlp * tl.load(gout_ptr + b64 * HW + offs_p, mask=mask_p, other=0.0)[None, :]
        tl.store(grad_ptr + elem, dlp.to(grad_ptr.dtype.element_ty), mask=mask)


def _grid_args(x: torch.Tensor, whole_image: bool):
    """Grid, split and tile; ``whole_image`` keeps one program per image (a per-image reduction)."""
    batch, channels, h, w = x.shape
    block_c, block_p = tile_shape(channels, h * w)
    split = 1 if whole_image else split_per_image(batch, triton.cdiv(h * w, block_p), x.device)
    return (batch, split), split, block_c, block_p


def logprob_forward(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, granularity: int) -> torch.Tensor:
    batch, channels, h, w = x.shape
    shape = {ELEMENT: (batch, channels, h, w), PIXEL: (batch, h, w), MEAN: (batch,)}[granularity]
    out = torch.empty(shape, dtype=torch.float32, device=x.device)
    grid, split, block_c, block_p = _grid_args(x, whole_image=granularity == MEAN)
    launch(_logprob_fwd_kernel, grid, x, mean, std, out, channels, w, h * w, split, 1.0 / (channels * h * w),
           *x.stride(), *mean.stride(),
           GRAN=granularity, X_FLAT=plane_is_flat(x), M_FLAT=plane_is_flat(mean), BLOCK_C=block_c, BLOCK_P=block_p,
           num_warps=num_warps(block_c * block_p))
    return out


def logprob_backward(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, grad_out: torch.Tensor,
                     granularity: int) -> torch.Tensor:
    batch, channels, h, w = x.shape
    grad = torch.empty((batch, channels, h, w), dtype=mean.dtype, device=mean.device)
    grid, split, block_c, block_p = _grid_args(x, whole_image=False)
    launch(_logprob_bwd_kernel, grid, x, mean, std, grad_out.contiguous(), grad, channels, w, h * w, split,
           1.0 / (channels * h * w),
           *x.stride(), *mean.stride(),
           GRAN=granularity, X_FLAT=plane_is_flat(x), M_FLAT=plane_is_flat(mean), BLOCK_C=block_c, BLOCK_P=block_p,
           num_warps=num_warps(block_c * block_p))
    return grad
