"""Weighted adaptive average pooling of reward maps to the latent grid (SPEC §3).

Block ``(i, j)`` covers rows ``[floor(i*H/h), ceil((i+1)*H/h))`` and columns likewise: the
boundaries of ``torch.nn.functional.adaptive_avg_pool2d``, for any (also non-integer) factor.
One program pools ``BLOCK_J`` latent pixels of one latent row: a ``(BLOCK_J, KW)`` tile per
image row, so each image row segment is read once with contiguous loads. One launch.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import launch


@triton.jit
def _pool_kernel(
    reward_ptr, weight_ptr, r_out_ptr, w_out_ptr,
    H, W, h, w,
    HAS_WEIGHT: tl.constexpr, BLOCK_J: tl.constexpr, KW: tl.constexpr,
):
    row = tl.program_id(0)  # b * h + i
    b = row // h
    i = row - b * h
    offs_j = tl.program_id(1) * BLOCK_J + tl.arange(0, BLOCK_J)
    mask_j = offs_j < w
    col_start = (offs_j * W) // w
    col_end = ((offs_j + 1) * W + w - 1) // w
    cols = col_start[:, None] + tl.arange(0, KW)[None, :]
    mask = mask_j[:, None] & (cols < col_end[:, None])
    row_start = (i * H) // h
    row_end = ((i + 1) * H + h - 1) // h
    image = b.to(tl.int64) * H * W
    num = tl.zeros([BLOCK_J, KW], dtype=tl.float32)
    den = tl.zeros([BLOCK_J, KW], dtype=tl.float32)
    for r in range(row_start, row_end):
        offs = image + r * W + cols
        rew = tl.load(reward_ptr + offs, mask=mask, other=0.0)
        if HAS_WEIGHT:
            wt = tl.load(weight_ptr + offs, mask=mask, other=0.0)
            num += wt * rew
            den += wt
        else:
            num += rew
    area = ((row_end - row_start) * (col_end - col_start)).to(tl.float32)
    out = b.to(tl.int64) * h * w + i * w + offs_j
    if HAS_WEIGHT:
        num_sum = tl.sum(num, axis=1)
        den_sum = tl.sum(den, axis=1)
        has_feedback = den_sum > 0
        r = tl.where(has_feedback, num_sum / tl.where(has_feedback, den_sum, 1.0), 0.0)
        tl.store(r_out_ptr + out, r, mask=mask_j)
        tl.store(w_out_ptr + out, den_sum / area, mask=mask_j)
    else:
        tl.store(r_out_ptr + out, tl.sum(num, axis=1) / area, mask=mask_j)
        tl.store(w_out_ptr + out, tl.full([BLOCK_J], 1.0, tl.float32), mask=mask_j)


def max_block_width(size: int, out: int) -> int:
    """Widest adaptive-pooling block: ``size / out`` for integer factors, else at most ``ceil(size / out) + 1``."""
    return size // out if size % out == 0 else triton.cdiv(size, out) + 1


def pool_rewards(reward: torch.Tensor, weight: torch.Tensor | None, h: int, w: int):
    """``(r, w)`` both ``(B, h, w)`` float32 from contiguous float32 ``(B, H, W)`` reward and weight maps."""
    batch, height, width = reward.shape
    reward = reward.contiguous()
    weight = weight.contiguous() if weight is not None else None
    r_out = torch.empty((batch, h, w), dtype=torch.float32, device=reward.device)
    w_out = torch.empty((batch, h, w), dtype=torch.float32, device=reward.device)
    kw = triton.next_power_of_2(max_block_width(width, w))
    block_j = max(1, min(triton.next_power_of_2(w), 1024 // kw))
    grid = (batch * h, triton.cdiv(w, block_j))
    launch(_pool_kernel, grid, reward, weight if weight is not None else reward, r_out, w_out, height, width, h, w,
           HAS_WEIGHT=weight is not None, BLOCK_J=block_j, KW=kw, num_warps=4 if block_j * kw >= 512 else 2)
    return r_out, w_out
