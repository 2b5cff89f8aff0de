"""Train pxpo's embedded text-to-image model (``pxpo_ext/embedded/tiny-shapes``) from scratch.

    python python/pretrain_tiny.py --threads 1 --unet-stop 1000   # the shipped weights (docs/embedded_model.md)
    python python/pretrain_tiny.py --quick --out /tmp/tiny         # a seconds-long smoke run
    python python/pretrain_tiny.py --evaluate                      # judge samples, time sampling, draw a grid

Four stages, all on scenes of :mod:`pxpo_ext.scenes` and reproducible from ``--seed``:

1. a CLIP tokenizer whose vocabulary is the scene captions' words (files generated here);
2. an ``AutoencoderKL`` (64x64 RGB <-> 4x16x16 latents), trained for reconstruction;
3. a ``UNet2DConditionModel`` and a small ``CLIPTextModel`` trained together on the VAE's
   latents of a fixed set of scenes (epsilon prediction, Min-SNR weighting, 10% of captions
   dropped for classifier-free guidance, EMA weights saved);
4. the VAE decoder alone, encoder frozen, to sharpen edges without moving the latent space.

The result is a standard diffusers pipeline folder: ``StableDiffusionPipeline.from_pretrained``
loads it offline.
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from diffusers.training_utils import compute_snr
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from pxpo_ext import embedded
from pxpo_ext.scenes import COLOURS, SHAPES, SceneGenerator

# Every word of the caption grammar becomes one token; other words fall back to characters.
WORDS = ("a", "an", "and", "on", "background", *COLOURS, *SHAPES)
# Stable Diffusion's noise schedule, so that samplers and trainers tuned for SD apply unchanged.
SCHEDULE = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
            "prediction_type": "epsilon", "clip_sample": False}


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte-to-character table, which a CLIP vocabulary is written in."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    extra = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + extra)
            extra += 1
    return dict(zip(bs, map(chr, cs)))


def _bpe(pieces: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """CLIP's byte-pair encoding of one word: repeatedly merge the adjacent pair of lowest rank."""
    while len(pieces) > 1:
        pair = min(itertools.pairwise(pieces), key=lambda p: ranks.get(p, math.inf))
        if pair not in ranks:
            break
        i = next(k for k in range(len(pieces) - 1) if (pieces[k], pieces[k + 1]) == pair)
        pieces = pieces[:i] + [pair[0] + pair[1]] + pieces[i + 2:]
    return pieces


def build_tokenizer(folder: Path) -> CLIPTokenizer:
    """Write vocab.json/merges.txt in which each of ``WORDS`` is one token (other text: characters)."""
    chars = list(_bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    ranks: dict[tuple[str, str], int] = {}
    # Merges learnt for one word can split another, so add merges until every word is whole.
    while True:
        split = [w for w in WORDS if len(_bpe(list(w[:-1]) + [w[-1] + "</w>"], ranks)) > 1]
        if not split:
            break
        pieces = _bpe(list(split[0][:-1]) + [split[0][-1] + "</w>"], ranks)
        ranks[(pieces[0], pieces[1])] = len(ranks)
        vocab.setdefault(pieces[0] + pieces[1], len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in ranks))
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=embedded.TEXT_LENGTH)
    for word in WORDS:
        ids = tokenizer(word, add_special_tokens=False).input_ids
        if ids != [vocab[word + "</w>"]]:
            raise RuntimeError(f"the generated tokenizer splits {word!r} into {ids}; fix build_tokenizer")
    return tokenizer


def build_models(vocab_size: int, tokenizer: CLIPTokenizer, quick: bool):
    width = 16 if quick else 64  # text width = cross-attention width
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=embedded.TEXT_LENGTH,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    # Norm groups of one channel would normalise a flat colour away; these hold 4 channels or more.
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(8, 16, 32), layers_per_block=1,
        latent_channels=embedded.LATENT_CHANNELS, norm_num_groups=2, sample_size=embedded.IMAGE_SIZE,
        mid_block_add_attention=False)  # fully convolutional, so it can train on crops
    # Attention only at 8x8 and 4x4 keeps a 20-step batch of 8 within the CPU budget.
    unet = UNet2DConditionModel(
        sample_size=embedded.LATENT_SIZE, in_channels=embedded.LATENT_CHANNELS, out_channels=embedded.LATENT_CHANNELS,
        block_out_channels=(16, 16, 32) if quick else (32, 48, 64), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=width, attention_head_dim=8, norm_num_groups=8)
    return text_encoder, vae, unet


def lr_at(step: int, steps: int, peak: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to a tenth of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))


def train_vae(vae: AutoencoderKL, images: torch.Tensor, steps: int, batch: int, lr: float, gen: torch.Generator,
              crop: int = 32) -> float:
    """Reconstruction (L1 + MSE) with a small KL term, as for Stable Diffusion's VAE, on random
    ``crop``-pixel crops: the VAE is fully convolutional and crops cost a quarter of whole images."""
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    bar = tqdm(range(steps), desc="vae", mininterval=5)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr, warmup=min(100, steps // 10 + 1))
        top, left = torch.randint(images.shape[-1] - crop + 1, (2,), generator=gen).tolist()
        x = images[torch.randint(len(images), (batch,), generator=gen), :, top:top + crop, left:left + crop] * 2 - 1
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=gen)
        recon = vae.decode(z).sample
        loss = F.l1_loss(recon, x) + F.mse_loss(recon, x) + 1e-6 * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    return loss.item()


def finetune_decoder(vae: AutoencoderKL, images: torch.Tensor, means: torch.Tensor, stds: torch.Tensor, steps: int,
                     batch: int, lr: float, gen: torch.Generator) -> float:
    """Sharpen the decoder on whole images with the encoder frozen, so the latent space (and the
    UNet trained on it) is unchanged; ``means``/``stds`` are the encoder's unscaled posteriors."""
    vae.requires_grad_(False)
    params = list(vae.decoder.parameters()) + list(vae.post_quant_conv.parameters())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    bar = tqdm(range(steps), desc="decoder", mininterval=5)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr, warmup=min(100, steps // 10 + 1))
        idx = torch.randint(len(images), (batch,), generator=gen)
        z = means[idx] + stds[idx] * torch.randn(means[idx].shape, generator=gen)
        x = images[idx] * 2 - 1
        recon = vae.decode(z).sample
        loss = F.l1_loss(recon, x) + F.mse_loss(recon, x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    vae.requires_grad_(False)
    return loss.item()


@torch.no_grad()
def encode(vae: AutoencoderKL, images: torch.Tensor, batch: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    means, stds = [], []
    for i in range(0, len(images), batch):
        dist = vae.encode(images[i:i + batch] * 2 - 1).latent_dist
        means.append(dist.mean)
        stds.append(dist.std)
    return torch.cat(means), torch.cat(stds)


def train_unet(unet, text_encoder, input_ids, empty_ids, means, stds, steps, batch, lr, gen, ema_decay,
               checkpoint=None, every=0, stop=None, drop=0.1):
    """Denoising (epsilon) loss with Min-SNR-5 weights; leaves the EMA weights in both models.

    ``checkpoint(step)`` is called every ``every`` steps with the EMA weights loaded; ``stop``
    ends training early at that step, with the learning-rate schedule still that of ``steps``."""
    noise_scheduler = DDPMScheduler(**SCHEDULE)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)
    ema = [p.detach().clone() for p in params]
    bar = tqdm(range(steps if stop is None else min(stop, steps)), desc="unet+text", mininterval=5)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr, warmup=min(300, steps // 10 + 1))
        idx = torch.randint(len(means), (batch,), generator=gen)
        latents = (means[idx] + stds[idx] * torch.randn(means[idx].shape, generator=gen))
        noise = torch.randn(latents.shape, generator=gen)
        t = torch.randint(0, SCHEDULE["num_train_timesteps"], (batch,), generator=gen)
        noisy = noise_scheduler.add_noise(latents, noise, t)
        ids = input_ids[idx].clone()
        ids[torch.rand(batch, generator=gen) < drop] = empty_ids  # unconditional, for classifier-free guidance
        hidden = text_encoder(ids).last_hidden_state
        pred = unet(noisy, t, hidden).sample
        snr = compute_snr(noise_scheduler, t)
        weight = snr.clamp(max=5.0) / snr
        loss = (weight * F.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3))).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(ema_decay, (1 + step) / (10 + step))
        torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - decay)
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
        if checkpoint is not None and every and (step + 1) % every == 0 and step + 1 < steps:
            live = [p.detach().clone() for p in params]
            torch._foreach_copy_([p.data for p in params], ema)
            checkpoint(step + 1)
            torch._foreach_copy_([p.data for p in params], live)
    torch._foreach_copy_([p.data for p in params], ema)
    return loss.item()


def save_grid(images: torch.Tensor, captions: list[str], path: str, columns: int = 4, scale: int = 2) -> None:
    """A PNG grid of images, each above its caption."""
    import textwrap

    import numpy as np
    from PIL import Image, ImageDraw

    side = images.shape[-1] * scale
    cell_w, text_h = side + 16, 40
    rows = math.ceil(len(images) / columns)
    canvas = Image.new("RGB", (columns * cell_w, rows * (side + text_h)), "white")
    draw = ImageDraw.Draw(canvas)
    for k, (image, caption) in enumerate(zip(images, captions)):
        x, y = (k % columns) * cell_w + 8, (k // columns) * (side + text_h)
        pixels = (image.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        canvas.paste(Image.fromarray(pixels).resize((side, side), Image.NEAREST), (x, y + 2))
        draw.multiline_text((x, y + side + 4), "\n".join(textwrap.wrap(caption, 26)), fill="black", spacing=1)
    canvas.save(path)


@torch.no_grad()
def evaluate(folder: str, n: int, guidance: float, steps: int, seed: int, grid: str | None, threads: int) -> dict:
    """Prompt fidelity by the ground-truth judge over ``n`` scene captions, and the sampling time."""
    from pxpo_ext.judge import fidelity, judge_batch
    from pxpo_ext.scenes import prompts

    torch.set_num_threads(threads)
    pipe = embedded.load_pipeline(path=folder)
    captions = prompts(n, seed=seed)
    images = []
    for i in tqdm(range(0, n, 50), desc="sampling"):
        batch = captions[i:i + 50]
        images.append(pipe(batch, num_inference_steps=steps, guidance_scale=guidance, output_type="pt",
                           generator=torch.Generator().manual_seed(seed + i)).images)
    images = torch.cat(images)
    result = {"fidelity": fidelity(judge_batch(images, captions)), "guidance": guidance, "steps": steps, "seed": seed}
    if grid:
        save_grid(images[:16], captions[:16], grid)
    times = []
    for _ in range(4):  # 8 images, CFG, text encoding and decoding included; the first run warms up
        t0 = time.perf_counter()
        pipe(captions[:8], num_inference_steps=embedded.NUM_INFERENCE_STEPS, guidance_scale=guidance, output_type="pt")
        times.append(time.perf_counter() - t0)
    result.update(sample_8x20_s=min(times[1:]), sample_8x20_all_s=[round(t, 2) for t in times], threads=threads)
    return result


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(embedded.pipeline_path()), help="pipeline folder to write")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="tiny models and a few steps: a smoke test")
    parser.add_argument("--scenes", type=int, default=4000, help="training scenes (latents precomputed once)")
    parser.add_argument("--vae-steps", type=int, default=1200)
    parser.add_argument("--vae-batch", type=int, default=16)
    parser.add_argument("--vae-from", help="take the trained VAE of this pipeline folder instead of training one")
    parser.add_argument("--decoder-steps", type=int, default=500, help="decoder-only steps after the UNet")
    parser.add_argument("--decoder-batch", type=int, default=8)
    parser.add_argument("--finetune-decoder", action="store_true",
                        help="only run the decoder stage on the pipeline at --out (as the last stage of training does)")
    parser.add_argument("--unet-steps", type=int, default=1500)
    parser.add_argument("--unet-stop", type=int, help="end UNet training at this step (schedule still --unet-steps)")
    parser.add_argument("--unet-batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--ema", type=float, default=0.995, help="EMA decay of the saved UNet/text weights")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--save-every", type=int, default=0, help="also save the pipeline every N UNet steps")
    parser.add_argument("--evaluate", action="store_true", help="evaluate the pipeline at --out instead of training")
    parser.add_argument("--eval-samples", type=int, default=200)
    parser.add_argument("--guidance", type=float, default=embedded.GUIDANCE_SCALE)
    parser.add_argument("--grid", help="with --evaluate: write a PNG grid of 16 samples here")
    args = parser.parse_args(argv)
    if args.evaluate:
        print(json.dumps(evaluate(args.out, args.eval_samples, args.guidance, embedded.NUM_INFERENCE_STEPS,
                                  args.seed + 1000, args.grid, args.threads)))
        return
    if min(args.vae_steps, args.unet_steps, args.decoder_steps, args.unet_stop or 1) < 1:
        parser.error("step counts must be 1 or more")
    if args.quick:
        args.scenes, args.vae_steps, args.unet_steps, args.decoder_steps = 64, 3, 3, 3
        args.vae_batch, args.unet_batch, args.decoder_batch = 4, 8, 4
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    start = time.time()
    timings = {}

    scenes = SceneGenerator(image_size=embedded.IMAGE_SIZE, seed=args.seed).generate(args.scenes)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = build_tokenizer(Path(tmp))
    text_encoder, vae, unet = build_models(len(tokenizer), tokenizer, args.quick)
    timings["data_s"] = time.time() - start

    if args.finetune_decoder:
        pipe = embedded.load_pipeline(path=args.out)
        decoder_loss = finetune_decoder(pipe.vae, scenes.images, *encode(pipe.vae, scenes.images), args.decoder_steps,
                                        args.decoder_batch, args.lr, torch.Generator().manual_seed(args.seed + 1))
        pipe.save_pretrained(args.out, safe_serialization=True)
        print(json.dumps({"decoder_steps": args.decoder_steps, "decoder_loss": decoder_loss, "total_s": time.time() - start}))
        return

    t0 = time.time()
    if args.vae_from:
        vae, vae_loss = AutoencoderKL.from_pretrained(args.vae_from, subfolder="vae"), None
    else:
        vae_loss = train_vae(vae, scenes.images, args.vae_steps, args.vae_batch, args.lr, gen)
    vae.eval().requires_grad_(False)
    means, stds = encode(vae, scenes.images)
    if not args.vae_from:  # unit-variance latents, as Stable Diffusion's scaling_factor gives
        vae.register_to_config(scaling_factor=1.0 / means.std().item())
    scale = vae.config.scaling_factor
    means, stds = means * scale, stds * scale
    timings["vae_s"] = time.time() - t0

    scheduler = DDIMScheduler(**SCHEDULE, set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)

    def save(step):
        pipe.save_pretrained(args.out, safe_serialization=True)
        (Path(args.out) / "training.json").write_text(json.dumps({"unet_step": step, "seed": args.seed}) + "\n")

    t0 = time.time()

    def token_ids(texts):
        return tokenizer(texts, padding="max_length", max_length=embedded.TEXT_LENGTH, truncation=True,
                         return_tensors="pt").input_ids

    unet_loss = train_unet(unet, text_encoder, token_ids(scenes.captions), token_ids([""])[0], means, stds,
                           args.unet_steps, args.unet_batch, args.lr, gen, args.ema, save, args.save_every,
                           args.unet_stop)
    timings["unet_s"] = time.time() - t0
    unet.eval()
    text_encoder.eval()

    t0 = time.time()  # its own generator, so that --finetune-decoder on a saved pipeline gives the same weights
    decoder_loss = finetune_decoder(vae, scenes.images, means / scale, stds / scale, args.decoder_steps,
                                    args.decoder_batch, args.lr, torch.Generator().manual_seed(args.seed + 1))
    timings["decoder_s"] = time.time() - t0
    pipe.save_pretrained(args.out, safe_serialization=True)
    size = sum(f.stat().st_size for f in Path(args.out).rglob("*.safetensors"))
    report = dict(seed=args.seed, scenes=args.scenes, vae_steps=args.vae_steps, unet_steps=args.unet_steps, unet_stop=args.unet_stop,
                  vae_loss=vae_loss, unet_loss=unet_loss, decoder_steps=args.decoder_steps, decoder_loss=decoder_loss, scaling_factor=scale, safetensors_mb=size / 1e6,
                  threads=args.threads, total_s=time.time() - start, **{k: round(v, 1) for k, v in timings.items()})
    (Path(args.out) / "training.json").write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
