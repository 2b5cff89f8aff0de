"""Random-weight Stable Diffusion and SDXL pipelines built from configs (8x8 latents, 16x16 images), offline.

Shared by the trainer, checkpoint, multi-process, CLI, feedback and experiment tests through the
session fixture ``tiny_model`` of ``conftest.py``.
"""
import json
import os

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer


def _byte_chars() -> list[str]:
    """CLIP's byte-to-character table: every byte gets a printable character."""
    kept = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    extra = [b for b in range(256) if b not in kept]
    return [chr(b) for b in kept] + [chr(256 + i) for i in range(len(extra))]


def _tokenizer(folder) -> CLIPTokenizer:
    """A byte-level CLIP tokenizer with no merges, written under ``folder/tok``."""
    chars = _byte_chars()
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    os.makedirs(f"{folder}/tok", exist_ok=True)
    with open(f"{folder}/tok/vocab.json", "w") as f:
        json.dump(vocab, f)
    with open(f"{folder}/tok/merges.txt", "w") as f:
        f.write("#version: 0.2\n")
    return CLIPTokenizer(f"{folder}/tok/vocab.json", f"{folder}/tok/merges.txt", model_max_length=77)


def _vae() -> AutoencoderKL:
    return AutoencoderKL(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, layers_per_block=1,
                         norm_num_groups=32)


def _text_config(**extra) -> CLIPTextConfig:
    return CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                          vocab_size=1000, max_position_embeddings=77, **extra)


def _scheduler(set_alpha_to_one: bool = False) -> DDIMScheduler:
    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                         set_alpha_to_one=set_alpha_to_one, steps_offset=1)


def build_tiny_pipeline(folder, set_alpha_to_one: bool = False) -> str:
    """A random-weight SD pipeline saved under ``folder/pipe`` (no download); returns its path."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=8, block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=8,
                                norm_num_groups=32)
    pipe = StableDiffusionPipeline(vae=_vae(), text_encoder=CLIPTextModel(_text_config()), tokenizer=_tokenizer(folder),
                                   unet=unet, scheduler=_scheduler(set_alpha_to_one), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(f"{folder}/pipe")
    return f"{folder}/pipe"


def build_tiny_sdxl_pipeline(folder) -> str:
    """A random-weight SDXL pipeline (two text encoders, pooled embedding and time ids) saved under
    ``folder/sdxl``; returns its path."""
    torch.manual_seed(0)
    time_dim, projection = 8, 16
    # SDXL's UNet sees both encoders' hidden states side by side, and the pooled embedding with 6 time ids.
    unet = UNet2DConditionModel(sample_size=8, block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=64,
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
                                use_linear_projection=True, addition_embed_type="text_time",
                                addition_time_embed_dim=time_dim,
                                projection_class_embeddings_input_dim=6 * time_dim + projection, norm_num_groups=32)
    tokenizer = _tokenizer(folder)
    pipe = StableDiffusionXLPipeline(
        vae=_vae(), text_encoder=CLIPTextModel(_text_config()),
        text_encoder_2=CLIPTextModelWithProjection(_text_config(projection_dim=projection)),
        tokenizer=tokenizer, tokenizer_2=tokenizer, unet=unet, scheduler=_scheduler(), force_zeros_for_empty_prompt=True)
    pipe.save_pretrained(f"{folder}/sdxl")
    return f"{folder}/sdxl"
