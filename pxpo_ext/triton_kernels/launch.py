"""Launch configuration (block sizes, programs per image, warps) and the launch wrapper.

The latent kernels walk one image per grid row: the grid is ``(B, split)`` and program ``(b, s)``
handles pixel blocks ``s, s + split, ...`` of image ``b``. ``split`` is chosen so that small
batches still fill the GPU while large batches (B=4096) get one program per image, which
reads every input once and needs no cross-program work inside an image.
"""
from __future__ import annotations

import functools
import os

import torch
import triton

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"  # read once, as triton.jit did at import

# Elements of one (channels x pixels) tile: 2048 is 16 per thread at 4 warps, four 16-byte
# float32 loads per tensor in flight. Tests lower it to exercise the multi-block and split paths on tiny latents.
MAX_TILE_ELEMENTS = 2048
PROGRAMS_PER_SM = 8  # enough resident programs to hide DRAM latency
INTERPRETER_SMS = 2  # what the split heuristic assumes under TRITON_INTERPRET=1


def tile_shape(channels: int, pixels: int) -> tuple[int, int]:
    """``(BLOCK_C, BLOCK_P)``: all channels of a pixel in one tile, as many pixels as fit."""
    block_c = triton.next_power_of_2(channels)
    block_p = max(1, min(triton.next_power_of_2(pixels), MAX_TILE_ELEMENTS // block_c))
    return block_c, block_p


def plane_is_flat(t: torch.Tensor) -> bool:
    """Whether pixel ``p = i * w + j`` of every ``(h, w)`` plane of ``t`` sits at offset ``p``."""
    h, w = t.shape[-2:]
    return (w == 1 or t.stride(-1) == 1) and (h == 1 or t.stride(-2) == w)


def num_warps(block_elements: int) -> int:
    return 8 if block_elements >= 4096 else 4 if block_elements >= 512 else 2


@functools.lru_cache(maxsize=None)
def _cuda_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def split_per_image(batch: int, num_blocks: int, device: torch.device) -> int:
    """Programs per image: 1 at large batch, up to ``num_blocks`` when the batch alone cannot fill the device."""
    if device.type == "cuda":
        sms = _cuda_sm_count(device.index if device.index is not None else torch.cuda.current_device())
    else:
        sms = INTERPRETER_SMS
    wanted = triton.cdiv(PROGRAMS_PER_SM * sms, batch)
    return max(1, min(num_blocks, wanted))


def _is_fake(arg) -> bool:
    from torch._subclasses.fake_tensor import is_fake

    return isinstance(arg, torch.Tensor) and (is_fake(arg) or arg.device.type == "meta")


def launch(kernel, grid, *args, **meta) -> None:
    """Launch ``kernel`` through :func:`torch.library.wrap_triton` (traceable by torch.compile).

    Under ``TRITON_INTERPRET=1`` ``wrap_triton`` hands back the bare interpreted kernel, which
    can only run on real CPU tensors; fake-tensor shape propagation (Dynamo, opcheck) needs only
    the outputs the launcher allocated, so the launch is skipped there.
    """
    if INTERPRETED and any(_is_fake(a) for a in args):
        return
    torch.library.wrap_triton(kernel)[grid](*args, **meta)
