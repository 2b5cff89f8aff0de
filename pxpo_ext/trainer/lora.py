"""LoRA on the UNet's attention projections through peft, saved in diffusers' format.

The adapter is added with ``unet.add_adapter`` as diffusers' own training scripts do, its
weights are kept in float32 whatever the frozen model's dtype, and
:func:`save_lora` writes ``pytorch_lora_weights.safetensors`` that stock diffusers loads with
``pipe.load_lora_weights(folder)``.
"""
from __future__ import annotations

import torch
from diffusers import StableDiffusionPipeline
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict

TARGET_MODULES = ["to_q", "to_k", "to_v", "to_out.0"]


def add_lora(unet, rank: int, alpha: float | None = None) -> list[torch.nn.Parameter]:
    """Freeze ``unet``, add a LoRA adapter (A gaussian, B zero: the model is unchanged at first).

    Returns the trainable parameters, cast to float32.
    """
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else rank,
                                init_lora_weights="gaussian", target_modules=TARGET_MODULES))
    params = [p for p in unet.parameters() if p.requires_grad]
    if not params:
        raise RuntimeError(f"the UNet has none of the attention projections {TARGET_MODULES}; LoRA cannot attach")
    for p in params:
        p.data = p.data.float()
    return params


def lora_state_dict(unet) -> dict[str, torch.Tensor]:
    """The adapter's weights in diffusers' key format (float32, CPU)."""
    state = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    return {k: v.detach().float().cpu().contiguous() for k, v in state.items()}


def save_lora(unet, folder, rank: int, alpha: float | None = None) -> None:
    """Write the adapter so that ``pipe.load_lora_weights(folder)`` restores it exactly (alpha included)."""
    metadata = {"r": rank, "lora_alpha": alpha if alpha is not None else rank, "target_modules": TARGET_MODULES}
    StableDiffusionPipeline.save_lora_weights(str(folder), unet_lora_layers=lora_state_dict(unet),
                                              safe_serialization=True, unet_lora_adapter_metadata=metadata)
