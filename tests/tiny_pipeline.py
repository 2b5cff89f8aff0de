"""A random-weight Stable-Diffusion-style pipeline built from configs (8x8 latents, 16x16 images), offline.

Shared by the trainer, checkpoint, multi-process, CLI, feedback and experiment tests through the
session fixture ``tiny_model`` of ``conftest.py``.
"""
import json
import os

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer


def _byte_chars() -> list[str]:
    """CLIP's byte-to-character table: every byte gets a printable character."""
    kept = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    extra = [b for b in range(256) if b not in kept]
    return [chr(b) for b in kept] + [chr(256 + i) for i in range(len(extra))]


def build_tiny_pipeline(folder, set_alpha_to_one: bool = False) -> str:
    """A random-weight SD pipeline saved under ``folder/pipe`` (no download); returns its path."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=8, block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=8,
                                norm_num_groups=32)
    vae = AutoencoderKL(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, layers_per_block=1,
                        norm_num_groups=32)
    text_encoder = CLIPTextModel(CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                num_attention_heads=4, vocab_size=1000, max_position_embeddings=77))
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
    tokenizer = CLIPTokenizer(f"{folder}/tok/vocab.json", f"{folder}/tok/merges.txt", model_max_length=77)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=set_alpha_to_one, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(f"{folder}/pipe")
    return f"{folder}/pipe"
