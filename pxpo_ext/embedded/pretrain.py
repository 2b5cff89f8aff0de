"""Training of pxpo's embedded text-to-image model (``pxpo_ext/embedded/tiny-shapes``) from scratch,
and its command line (``python/pretrain_tiny.py`` calls :func:`main`):

    python python/pretrain_tiny.py --quick --out /tmp/tiny         # a seconds-long smoke run
    python python/pretrain_tiny.py --device cuda --max-minutes 6 ...   # a time-boxed run (the shipped weights'
                                                                     # commands: docs/embedded_model.md)
    python python/pretrain_tiny.py --init-from FOLDER --lr 3e-4 ...   # continue training a saved pipeline
    python python/pretrain_tiny.py --evaluate                      # judge samples, time sampling, draw a grid

Four stages, all on scenes of :mod:`pxpo_ext.scenes` and reproducible from ``--seed``:

1. a CLIP tokenizer whose vocabulary is the scene captions' words (files generated here);
2. an ``AutoencoderKL`` (64x64 RGB <-> 4x16x16 latents), trained for reconstruction;
3. a ``UNet2DConditionModel`` and a small ``CLIPTextModel`` trained together on the VAE's
   latents of a fixed set of scenes (epsilon prediction, Min-SNR weighting, offset noise, 10% of
   captions dropped for classifier-free guidance, EMA weights saved);
4. the VAE decoder alone, encoder frozen, to sharpen edges without moving the latent space.

The result is a standard diffusers pipeline folder: ``StableDiffusionPipeline.from_pretrained``
loads it offline. ``--max-minutes`` gives the whole run a wall-clock budget, shared out among the
three training stages (``--budget-shares``); each stops when its share is spent and the pipeline is
always saved before the budget ends (also after the UNet stage, so a run killed during the last
stage still leaves a usable pipeline).
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import multiprocessing
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from diffusers.training_utils import compute_snr
from tqdm import tqdm
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from .. import embedded
from ..scenes import COLOURS, SHAPES, SceneGenerator

# Every word of the caption grammar becomes one token; other words fall back to characters.
WORDS = ("a", "an", "and", "on", "background", *COLOURS, *SHAPES)
# Stable Diffusion's noise schedule, so that samplers and trainers tuned for SD apply unchanged.
SCHEDULE = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
            "prediction_type": "epsilon", "clip_sample": False}
# --evaluate also denoises generator scenes noised by this share of the 20-step schedule (6 steps from t=251, where
# 67% of the variance is still signal): a UNet that keeps shapes there has only the layout left to learn.
RENOISE_STRENGTH = 0.3


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


# The UNet's channels per resolution (16x16, 8x8, 4x4). "wide" is the shipped model's: 5.5M parameters
# (22.0 MB in float32, so the pipeline stays under the 25 MB the package allows). "small" has a quarter of
# them and trains 2.5x faster per step on the 2-core CPU, but learned more slowly per CPU minute; on a GPU
# both are launch-bound (docs/embedded_model.md).
UNET_CHANNELS = {"small": (32, 48, 64), "wide": (64, 96, 128)}


def build_models(vocab_size: int, tokenizer: CLIPTokenizer, quick: bool, unet_size: str = "wide"):
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
        block_out_channels=(16, 16, 32) if quick else UNET_CHANNELS[unet_size], layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=width, attention_head_dim=8, norm_num_groups=8)
    return text_encoder, vae, unet


# Config entries that must agree between an --init-from pipeline and the models this run builds
# (with the parameters' names and shapes; other entries may differ between library versions).
ARCHITECTURE_KEYS = {
    "text_encoder": ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "max_position_embeddings", "hidden_act"),
    "vae": ("in_channels", "out_channels", "down_block_types", "up_block_types", "block_out_channels",
            "layers_per_block", "latent_channels", "norm_num_groups", "mid_block_add_attention"),
    "unet": ("sample_size", "in_channels", "out_channels", "block_out_channels", "layers_per_block",
             "down_block_types", "up_block_types", "cross_attention_dim", "attention_head_dim", "norm_num_groups"),
}


def load_models(folder: str | Path, tokenizer: CLIPTokenizer, quick: bool, unet_size: str = "wide"):
    """The tokenizer, text encoder, VAE and UNet of the pipeline folder ``folder`` (for --init-from),
    checked against those this run would build (``build_models(..., quick, unet_size)`` and the generated
    ``tokenizer``); a ValueError names every difference."""
    folder = Path(folder)
    missing = [part for part in ("tokenizer", "text_encoder", "vae", "unet") if not (folder / part).is_dir()]
    if not (folder / "model_index.json").is_file() or missing:
        raise ValueError(f"--init-from {folder}: not a pipeline folder written by this script "
                         f"(missing: {', '.join(missing) or 'model_index.json'})")
    loaded_tokenizer = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer")
    loaded = {"text_encoder": CLIPTextModel.from_pretrained(folder, subfolder="text_encoder"),
              "vae": AutoencoderKL.from_pretrained(folder, subfolder="vae"),
              "unet": UNet2DConditionModel.from_pretrained(folder, subfolder="unet")}
    fresh = dict(zip(("text_encoder", "vae", "unet"), build_models(len(tokenizer), tokenizer, quick, unet_size)))
    problems = []
    if loaded_tokenizer.get_vocab() != tokenizer.get_vocab():
        problems.append("tokenizer: its vocabulary differs from the one this script generates")
    for name, model in loaded.items():
        for key in ARCHITECTURE_KEYS[name]:  # configs: attributes (tuples read back from JSON as lists)
            was, now = (getattr(m.config, key, None) for m in (model, fresh[name]))
            if (list(was) if isinstance(was, tuple) else was) != (list(now) if isinstance(now, tuple) else now):
                problems.append(f"{name}.{key}: {was!r} in the folder, {now!r} in this run")
        shapes_old = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        shapes_new = {k: tuple(v.shape) for k, v in fresh[name].state_dict().items()}
        if shapes_old != shapes_new:
            diff = sorted(k for k in shapes_old.keys() | shapes_new.keys() if shapes_old.get(k) != shapes_new.get(k))
            problems.append(f"{name}: {len(diff)} parameters differ in name or shape (e.g. {diff[0]})")
    if problems:
        hint = (" (this run builds the --quick models)" if quick
                else f" (this run builds the --unet-size {unet_size} models; a --quick folder needs --quick)")
        raise ValueError(f"--init-from {folder}: the architecture differs from this script's{hint}:\n  "
                         + "\n  ".join(problems))
    return loaded_tokenizer, loaded["text_encoder"], loaded["vae"], loaded["unet"]


def previous_record(folder: str | Path) -> dict | None:
    """The training.json of a pipeline folder (which keeps its own "previous"), or None."""
    try:
        return json.loads((Path(folder) / "training.json").read_text())
    except (OSError, ValueError):
        return None


def _unet_steps_total(record: dict | None) -> int | None:
    """UNet steps done along a chain of training.json records (None when a record lacks them)."""
    total = 0
    while record is not None:
        done = (record.get("stages") or {}).get("unet", {}).get("steps_done")
        if done is None:
            done = record.get("unet_stop") or record.get("unet_steps")  # runs without a budget ran all their steps
        if done is None:
            return None
        total += done
        record = record.get("previous")
    return total


def _scene_chunk(job: tuple[int, int, int, bool]):
    """Scenes ``start .. stop - 1`` of seed ``seed``: an (n, 3, H, W) uint8 array (exact: every
    pixel is a palette colour, ``k / 255``), the captions and, if ``objects``, an (n, H, W) bool
    array of the pixels covered by objects (else None); small to send between processes."""
    import numpy as np

    seed, start, stop, objects = job
    generator = SceneGenerator(image_size=embedded.IMAGE_SIZE, seed=seed)
    scenes = [generator.sample(i) for i in range(start, stop)]
    images = np.rint(np.stack([s.image.numpy() for s in scenes]) * 255).astype(np.uint8)
    covered = np.stack([s.label_map().numpy() > 0 for s in scenes]) if objects else None
    return images, [s.caption for s in scenes], covered


def make_scenes(n: int, seed: int, workers: int = 1,
                objects: bool = False) -> tuple[torch.Tensor, list[str], torch.Tensor | None]:
    """The first ``n`` scenes of ``SceneGenerator(seed=seed)`` as ((n, 3, H, W) float32 in [0, 1],
    captions, (n, H, W) bool object pixels if ``objects`` else None); the same whatever ``workers``
    (processes forked when there are 2,000 scenes or more)."""
    chunk = 500
    jobs = [(seed, a, min(a + chunk, n), objects) for a in range(0, n, chunk)]
    parts = None
    if workers > 1 and n >= 2000 and "fork" in multiprocessing.get_all_start_methods():
        try:
            with multiprocessing.get_context("fork").Pool(min(workers, len(jobs))) as pool:
                # A timeout, in case a forked worker hangs: about 15 times the expected time.
                parts = pool.map_async(_scene_chunk, jobs).get(timeout=10 + 0.015 * n / min(workers, len(jobs)))
        except Exception as error:  # noqa: BLE001 - fall back to one process
            print(f"parallel scene generation failed ({error!r}); generating in one process", file=sys.stderr)
    if parts is None:
        parts = [_scene_chunk(job) for job in jobs]
    images = torch.cat([torch.from_numpy(p[0]) for p in parts]).float() / 255
    covered = torch.cat([torch.from_numpy(p[2]) for p in parts]) if objects else None
    return images, [c for p in parts for c in p[1]], covered


class Budget:
    """A wall-clock budget for the whole run, shared out among the stages ``vae``, ``unet`` and
    ``decoder``. A stage's deadline is set when it starts: the time left (less ``reserve_s`` for
    saving) times its share of the shares of the stages still to run, so time a stage leaves
    unused passes on to the next ones. No budget (``minutes=None``): no deadlines."""

    STAGES = ("vae", "unet", "decoder")

    def __init__(self, minutes: float | None, shares: tuple[float, float, float], start: float):
        self.end = None if minutes is None else start + 60 * minutes
        self.reserve_s = 0.0 if minutes is None else min(8.0, max(1.0, 0.04 * 60 * minutes))
        self.shares = dict(zip(self.STAGES, shares))

    def deadline(self, stage: str) -> float | None:
        if self.end is None:
            return None
        later = sum(self.shares[s] for s in self.STAGES[self.STAGES.index(stage):])
        now = time.time()
        return now + max(0.0, self.end - self.reserve_s - now) * self.shares[stage] / max(later, 1e-9)


class Clock:
    """Stopping and schedule progress of one stage: ``steps`` planned, an optional ``deadline``
    (time.time()) and ``stop`` step. With ``by_time``, the learning-rate schedule's progress is
    the larger of the steps' and the time's fraction, so the cosine decay ends by the deadline
    however fast the device is; otherwise it follows the steps alone (as with --unet-stop)."""

    def __init__(self, steps: int, deadline: float | None = None, stop: int | None = None, by_time: bool = True):
        self.steps, self.deadline, self.stop, self.by_time = steps, deadline, stop, by_time
        self.start = time.time()
        self.done = 0
        self.stopped_by = "steps"

    def __iter__(self):
        last = self.steps if self.stop is None else min(self.stop, self.steps)
        for step in range(last):
            # At least one step, so that every stage leaves weights and a loss.
            if step and self.deadline is not None and time.time() >= self.deadline:
                self.stopped_by = "budget"
                return
            yield step
            self.done = step + 1
        if self.stop is not None and self.stop < self.steps:
            self.stopped_by = "stop"

    def time_fraction(self) -> float | None:
        if not self.by_time or self.deadline is None:
            return None
        return min(1.0, (time.time() - self.start) / max(1e-6, self.deadline - self.start))

    def lr(self, step: int, peak: float, warmup: int) -> float:
        return lr_at(step, self.steps, peak, warmup, self.time_fraction())

    def record(self, seconds: float | None = None) -> dict:
        out = {"steps_planned": self.steps, "steps_done": self.done, "stopped_by": self.stopped_by,
               "s": round(time.time() - self.start if seconds is None else seconds, 1)}
        if self.done:
            out["steps_per_s"] = round(self.done / max(1e-6, out["s"]), 1)
        return out


def lr_at(step: int, steps: int, peak: float, warmup: int, time_fraction: float | None = None) -> float:
    """Linear warm-up, then cosine decay to a tenth of the peak; the decay's progress is that of the
    steps or, when larger, ``time_fraction`` (the share of a stage's time budget spent)."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    if time_fraction is not None:
        progress = min(1.0, max(progress, time_fraction))
    return peak * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))


def _optimizer(params, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    params = list(params)
    fused = {"fused": True} if params and params[0].device.type == "cuda" else {}  # fewer kernel launches
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, **fused)


def _autocast(device: torch.device, bf16: bool):
    import contextlib

    if bf16 and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def train_vae(vae: AutoencoderKL, images: torch.Tensor, steps: int, batch: int, lr: float, gen: torch.Generator,
              crop: int = 32, clock: Clock | None = None, noise_gen: torch.Generator | None = None,
              bf16: bool = False) -> float:
    """Reconstruction (L1 + MSE) with a small KL term, as for Stable Diffusion's VAE, on random
    ``crop``-pixel crops: the VAE is fully convolutional and crops cost a quarter of whole images.

    ``gen`` (CPU) draws crops and indices, ``noise_gen`` (on the images' device; default ``gen``)
    the posterior samples; ``clock`` may stop training early (its ``done`` counts the steps)."""
    clock = clock or Clock(steps)
    device = images.device
    noise_gen = noise_gen or gen
    opt = _optimizer(vae.parameters(), lr, 0.0)
    bar = tqdm(clock, total=clock.steps, desc="vae", mininterval=5)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = clock.lr(step, lr, warmup=min(100, steps // 10 + 1))
        top, left = torch.randint(images.shape[-1] - crop + 1, (2,), generator=gen).tolist()
        idx = torch.randint(len(images), (batch,), generator=gen).to(device)
        x = images[idx, :, top:top + crop, left:left + crop] * 2 - 1
        with _autocast(device, bf16):
            posterior = vae.encode(x).latent_dist
            z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=noise_gen, device=device,
                                                             dtype=posterior.mean.dtype)
            recon = vae.decode(z).sample.float()
        loss = F.l1_loss(recon, x) + F.mse_loss(recon, x) + 1e-6 * posterior.kl().float().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    return loss.item()


def finetune_decoder(vae: AutoencoderKL, images: torch.Tensor, means: torch.Tensor, stds: torch.Tensor, steps: int,
                     batch: int, lr: float, gen: torch.Generator, clock: Clock | None = None,
                     noise_gen: torch.Generator | None = None, bf16: bool = False) -> float:
    """Sharpen the decoder on whole images with the encoder frozen, so the latent space (and the
    UNet trained on it) is unchanged; ``means``/``stds`` are the encoder's unscaled posteriors."""
    clock = clock or Clock(steps)
    device = images.device
    noise_gen = noise_gen or gen
    vae.requires_grad_(False)
    params = list(vae.decoder.parameters()) + list(vae.post_quant_conv.parameters())
    for p in params:
        p.requires_grad_(True)
    opt = _optimizer(params, lr, 0.0)
    bar = tqdm(clock, total=clock.steps, desc="decoder", mininterval=5)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = clock.lr(step, lr, warmup=min(100, steps // 10 + 1))
        idx = torch.randint(len(images), (batch,), generator=gen).to(device)
        z = means[idx] + stds[idx] * torch.randn(means[idx].shape, generator=noise_gen, device=device)
        x = images[idx] * 2 - 1
        with _autocast(device, bf16):
            recon = vae.decode(z).sample.float()
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
    """The encoder's posterior means and standard deviations (unscaled), on the images' device."""
    means, stds = [], []
    for i in range(0, len(images), batch):
        dist = vae.encode(images[i:i + batch] * 2 - 1).latent_dist
        means.append(dist.mean)
        stds.append(dist.std)
    return torch.cat(means), torch.cat(stds)


def train_unet(unet, text_encoder, input_ids, empty_ids, means, stds, steps, batch, lr, gen, ema_decay,
               checkpoint=None, every=0, stop=None, drop=0.1, offset_noise=0.0, clock=None, noise_gen=None,
               bf16=False, warmup=None, ema_warmup=True, pixel_weights=None, snr_gamma=5.0):
    """Denoising (epsilon) loss with Min-SNR-``snr_gamma`` weights (0: none, the plain epsilon loss);
    leaves the EMA weights in both models.

    ``pixel_weights``: an optional (n, 1, h, w) weight per latent pixel of each training latent; each
    latent's squared error is then their weighted mean instead of the plain mean (``--object-weight``).

    ``offset_noise``: the noise gets a per-image, per-channel constant drawn from N(0, offset_noise^2)
    ("Diffusion with Offset Noise", Guttenberg 2023), so the model learns to move the mean of a
    latent (the flat background) away from that of the initial noise. ``checkpoint(step)`` is
    called every ``every`` steps with the EMA weights loaded; ``stop`` ends training early at that
    step, with the learning-rate schedule still that of ``steps``; so may ``clock``'s deadline.
    ``gen`` (CPU) draws indices, ``noise_gen`` (on the latents' device; default ``gen``) the rest.
    ``warmup``: learning-rate warm-up steps (default min(300, steps // 10 + 1)). The EMA starts
    from the models' weights; with ``ema_warmup`` its decay ramps up from 0.1 (right for random
    initial weights), without it (continuing trained weights) it is ``ema_decay`` from the start."""
    clock = clock or Clock(steps, stop=stop)
    warmup = min(300, steps // 10 + 1) if warmup is None else max(1, warmup)
    device = means.device
    noise_gen = noise_gen or gen
    noise_scheduler = DDPMScheduler(**SCHEDULE)
    noise_scheduler.alphas_cumprod = noise_scheduler.alphas_cumprod.to(device)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = _optimizer(params, lr, 1e-2)
    ema = [p.detach().clone() for p in params]
    empty_ids = empty_ids.to(device)
    bar = tqdm(clock, total=clock.steps if clock.stop is None else min(clock.stop, clock.steps), desc="unet+text",
               mininterval=5)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = clock.lr(step, lr, warmup=warmup)
        idx = torch.randint(len(means), (batch,), generator=gen).to(device)
        latents = (means[idx] + stds[idx] * torch.randn(means[idx].shape, generator=noise_gen, device=device))
        noise = torch.randn(latents.shape, generator=noise_gen, device=device)
        if offset_noise:
            noise = noise + offset_noise * torch.randn(latents.shape[:2] + (1, 1), generator=noise_gen, device=device)
        t = torch.randint(0, SCHEDULE["num_train_timesteps"], (batch,), generator=noise_gen, device=device)
        noisy = noise_scheduler.add_noise(latents, noise, t)
        # unconditional, for classifier-free guidance (torch.where: no device sync, unlike a masked assignment)
        dropped = torch.rand(batch, generator=noise_gen, device=device) < drop
        ids = torch.where(dropped[:, None], empty_ids[None], input_ids[idx])
        with _autocast(device, bf16):
            hidden = text_encoder(ids).last_hidden_state
            pred = unet(noisy, t, hidden).sample.float()
        if snr_gamma:  # min(SNR, gamma) / SNR: low-noise steps, where epsilon is hard to see, count less
            snr = compute_snr(noise_scheduler, t)
            weight = snr.clamp(max=snr_gamma) / snr
        else:
            weight = torch.ones_like(t, dtype=torch.float32)
        error = F.mse_loss(pred, noise, reduction="none")
        if pixel_weights is None:
            error = error.mean(dim=(1, 2, 3))
        else:
            pw = pixel_weights[idx]
            error = (pw * error).mean(dim=(1, 2, 3)) / pw.mean(dim=(1, 2, 3))
        loss = (weight * error).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(ema_decay, (1 + step) / (10 + step)) if ema_warmup else ema_decay
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
def judge_samples(pipe, n: int, guidance: float, steps: int, seed: int, progress: bool = False):
    """``(captions, images, rates)``: ``n`` scene captions (of generator ``seed``) sampled by ``pipe``
    (batches of 50, each from a CPU generator seeded by its first index) and judged against their captions
    (:func:`judged_rates`)."""
    from pxpo_ext.scenes import prompts

    captions = prompts(n, seed=seed)
    images = []
    for i in tqdm(range(0, n, 50), desc="sampling", disable=not progress):
        images.append(pipe(captions[i:i + 50], num_inference_steps=steps, guidance_scale=guidance, output_type="pt",
                           generator=torch.Generator().manual_seed(seed + i)).images.float().cpu())
    images = torch.cat(images)
    return captions, images, judged_rates(images, captions)


def judged_rates(images: torch.Tensor, captions: list[str]) -> dict:
    """The judge's rates (:func:`pxpo_ext.judge.fidelity`) and, under ``objects_by_outcome``, the share
    of named objects found, drawn as another shape, of no plausible size, or absent in their colour."""
    from pxpo_ext.judge import fidelity, judge_batch, outcome_shares

    judgements = judge_batch(images, captions)
    return {**fidelity(judgements), "objects_by_outcome": outcome_shares(judgements)}


@torch.no_grad()
def renoised_rates(pipe, scenes: list, strength: float, guidance: float, steps: int, seed: int) -> dict:
    """The judge on generator scenes noised by ``strength`` of the sampling schedule and denoised from
    their own captions (diffusers' image-to-image pipeline): whether the UNet keeps shapes that it
    did not have to place. The VAE's reconstructions bound it from above."""
    img2img = StableDiffusionImg2ImgPipeline(**pipe.components, requires_safety_checker=False)
    img2img.set_progress_bar_config(disable=True)
    images, captions = [], [scene.caption for scene in scenes]
    for i in range(0, len(scenes), 50):
        batch = torch.stack([scene.image for scene in scenes[i:i + 50]]).to(pipe.device)
        images.append(img2img(captions[i:i + 50], image=batch, strength=strength, num_inference_steps=steps,
                              guidance_scale=guidance, output_type="pt",
                              generator=torch.Generator().manual_seed(seed + i)).images.float().cpu())
    return judged_rates(torch.cat(images), captions)


def evaluate(folder: str, n: int, guidance: float, steps: int, seed: int, grid: str | None, threads: int,
             device: str = "cpu") -> dict:
    """Prompt fidelity by the ground-truth judge over ``n`` scene captions; the VAE's ceiling (the same
    judge on ``n`` generator scenes encoded and decoded: sampling cannot beat what the decoder can draw);
    and the sampling time (it only means the CPU target on the CPU; generators stay on the CPU either way)."""
    torch.set_num_threads(threads)
    pipe = embedded.load_pipeline(path=folder).to(device)
    generator = SceneGenerator(image_size=embedded.IMAGE_SIZE, seed=seed)
    scenes = [generator.sample(i) for i in range(n)]
    originals = torch.stack([scene.image for scene in scenes]).to(device)
    decoded = pipe.vae.decode(pipe.vae.encode(originals * 2 - 1).latent_dist.mean).sample
    vae_ceiling = judged_rates((decoded / 2 + 0.5).clamp(0, 1).float().cpu(), [sc.caption for sc in scenes])
    captions, images, judged = judge_samples(pipe, n, guidance, steps, seed, progress=True)
    result = {"fidelity": judged, "vae_reconstruction_fidelity": vae_ceiling,
              f"renoised_{RENOISE_STRENGTH}_fidelity": renoised_rates(pipe, scenes, RENOISE_STRENGTH, guidance,
                                                                      embedded.NUM_INFERENCE_STEPS, seed),
              "guidance": guidance, "steps": steps, "seed": seed}
    if grid:
        save_grid(images[:16], captions[:16], grid)
    times = []
    for _ in range(4):  # 8 images, CFG, text encoding and decoding included; the first run warms up
        t0 = time.perf_counter()
        pipe(captions[:8], num_inference_steps=embedded.NUM_INFERENCE_STEPS, guidance_scale=guidance,
             output_type="pt").images.cpu()
        times.append(time.perf_counter() - t0)
    result.update(sample_8x20_s=min(times[1:]), sample_8x20_all_s=[round(t, 2) for t in times], threads=threads,
                  device=str(device))
    return result


def _shares(text: str) -> tuple[float, float, float]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 3 or min(values) < 0 or sum(values) <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: give three non-negative numbers VAE,UNET,DECODER, e.g. 0.25,0.6,0.15")
    return values


def main(argv=None) -> None:
    start = time.time()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(embedded.pipeline_path()), help="pipeline folder to write")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="tiny models and a few steps: a smoke test")
    parser.add_argument("--device", help="torch device to train on (default: cuda if available, else cpu); "
                                         "scenes are drawn on the CPU and moved there")
    parser.add_argument("--scenes", type=int, default=4000, help="training scenes (latents precomputed once)")
    parser.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 1),
                        help="processes drawing the scenes (used from 2,000 scenes on; the scenes do not depend on it)")
    parser.add_argument("--vae-steps", type=int, default=1200)
    parser.add_argument("--vae-batch", type=int, default=16)
    parser.add_argument("--vae-crop", type=int, default=32, help="side of the random crops the VAE trains on")
    parser.add_argument("--vae-from", help="take the trained VAE of this pipeline folder instead of training one")
    parser.add_argument("--init-from", help="continue training the pipeline in this folder: its tokenizer, text "
                                            "encoder, VAE and UNet are loaded (same architecture required), the VAE "
                                            "stage is skipped, the UNet+text stage continues from the loaded (EMA) "
                                            "weights, then the decoder stage; a lower --lr (e.g. 3e-4) suits")
    parser.add_argument("--unet-warmup", type=int,
                        help="learning-rate warm-up steps of the UNet stage (default min(300, steps/10 + 1); "
                             "with --init-from min(100, steps/10 + 1))")
    parser.add_argument("--decoder-steps", type=int, default=500,
                        help="decoder-only steps after the UNet; 0 keeps the decoder as it is (e.g. to study the UNet "
                             "alone: one step takes the full --lr, which from 1e-3 up harms a trained decoder)")
    parser.add_argument("--decoder-batch", type=int, default=8)
    parser.add_argument("--finetune-decoder", action="store_true",
                        help="only run the decoder stage on the pipeline at --out (as the last stage of training does), "
                             "appending its record to that folder's training.json under 'decoder_finetunes'")
    parser.add_argument("--unet-steps", type=int, default=1500)
    parser.add_argument("--unet-stop", type=int, help="end UNet training at this step (schedule still --unet-steps)")
    parser.add_argument("--unet-batch", type=int, default=32)
    parser.add_argument("--unet-size", choices=tuple(UNET_CHANNELS), default="wide",
                        help="the UNet's width: wide (the shipped model's) or small (a quarter of the parameters, "
                             "2.5x faster per step on a CPU; see docs/embedded_model.md); ignored with --quick")
    parser.add_argument("--offset-noise", type=float, default=0.1,
                        help="std of the per-image, per-channel constant added to the UNet's training noise "
                             "(0: plain noise; the shipped weights used 0.1)")
    parser.add_argument("--object-weight", type=float, default=0.0, metavar="W",
                        help="weight object pixels 1 + W times the background in the UNet's loss (the scenes' own "
                             "masks, averaged to the latent grid): objects are a small part of each image")
    parser.add_argument("--snr-gamma", type=float, default=5.0, metavar="G",
                        help="Min-SNR-G weights of the UNet's epsilon loss, min(SNR, G) / SNR (0: none, the plain "
                             "epsilon loss, which weighs the low-noise steps that draw fine detail more)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--ema", type=float, default=0.995, help="EMA decay of the saved UNet/text weights")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-minutes", type=float,
                        help="wall-clock budget of the whole run (from the start of main; imports not counted): "
                             "each stage stops when its share is spent, and the pipeline is saved before the end")
    parser.add_argument("--budget-shares", type=_shares, default=(0.25, 0.6, 0.15),
                        help="with --max-minutes: VAE,UNET,DECODER shares of the training time (default 0.25,0.6,0.15); "
                             "time a stage leaves unused passes on to the next")
    parser.add_argument("--schedule-by", choices=("time", "steps"), default="time",
                        help="with --max-minutes: 'time' (default) decays each stage's learning rate by the larger of "
                             "the fraction of its steps and of its time share done, so it anneals by the deadline; "
                             "'steps' keeps the schedule of the full step count (as --unet-stop does)")
    parser.add_argument("--bf16", action="store_true", help="on CUDA, bfloat16 autocast (weights, EMA and loss in float32)")
    parser.add_argument("--save-every", type=int, default=0, help="also save the pipeline every N UNet steps")
    parser.add_argument("--judge-every-save", type=int, default=0, metavar="N",
                        help="with --save-every: also sample N captions (seed + 1000, 20 steps, guidance 5) on the "
                             "training device at every save and judge them, recording the learning curve in "
                             "training.json ('judged'); the time counts against the UNet stage's budget")
    parser.add_argument("--evaluate", action="store_true", help="evaluate the pipeline at --out instead of training")
    parser.add_argument("--eval-samples", type=int, default=200)
    parser.add_argument("--guidance", type=float, default=embedded.GUIDANCE_SCALE)
    parser.add_argument("--eval-steps", type=int, default=embedded.NUM_INFERENCE_STEPS,
                        help="with --evaluate: DDIM steps of the judged samples (the timed batch always uses "
                             f"{embedded.NUM_INFERENCE_STEPS})")
    parser.add_argument("--grid", help="with --evaluate: write a PNG grid of 16 samples here")
    args = parser.parse_args(argv)
    if args.evaluate:
        print(json.dumps(evaluate(args.out, args.eval_samples, args.guidance, args.eval_steps,
                                  args.seed + 1000, args.grid, args.threads, args.device or "cpu")))
        return
    if args.init_from and (args.vae_from or args.finetune_decoder):
        parser.error("--init-from loads the VAE too: it does not combine with --vae-from or --finetune-decoder")
    if args.unet_warmup is not None and args.unet_warmup < 1:
        parser.error("--unet-warmup must be 1 or more")
    if min(args.vae_steps, args.unet_steps, args.unet_stop or 1) < 1 or args.decoder_steps < 0:
        parser.error("step counts must be 1 or more (--decoder-steps: 0 or more)")
    if args.finetune_decoder and args.decoder_steps < 1:
        parser.error("--finetune-decoder needs --decoder-steps 1 or more")
    if args.max_minutes is not None and args.max_minutes <= 0:
        parser.error("--max-minutes must be positive")
    if not 0 <= args.offset_noise < 1:
        parser.error("--offset-noise must be in [0, 1)")
    if args.object_weight < 0:
        parser.error("--object-weight must be 0 or more (object pixels weigh 1 + W)")
    if args.snr_gamma < 0:
        parser.error("--snr-gamma must be 0 (no Min-SNR weights) or more")
    if args.judge_every_save < 0 or (args.judge_every_save and not (args.save_every or args.max_minutes)):
        parser.error("--judge-every-save N judges at each save: give --save-every (or --max-minutes, which saves "
                     "after the UNet stage) and N >= 0")
    if args.quick:
        args.scenes, args.vae_steps, args.unet_steps = 64, 3, 3
        args.decoder_steps = min(args.decoder_steps, 3)  # 0 stays 0
        args.vae_batch, args.unet_batch, args.decoder_batch = 4, 8, 4
    if not 8 <= args.vae_crop <= embedded.IMAGE_SIZE or args.vae_crop % 4:
        parser.error(f"--vae-crop must be a multiple of 4 from 8 to {embedded.IMAGE_SIZE}")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    timings = {}

    # Scenes first: worker processes are forked before anything touches CUDA.
    images, captions, object_pixels = make_scenes(args.scenes, args.seed, args.workers,
                                                  objects=args.object_weight > 0)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes throughout
        torch.set_float32_matmul_precision("high")  # TF32 matmuls (cuDNN convolutions use TF32 by default)
        device_name = torch.cuda.get_device_name(device)
    else:
        device_name = "cpu"
    # On the CPU one generator draws everything (the sequence of earlier versions); elsewhere noise,
    # timesteps and dropout are drawn on the device, indices and crops still on the CPU.
    noise_gen = gen if device.type == "cpu" else torch.Generator(device).manual_seed(args.seed)
    images = images.to(device)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = build_tokenizer(Path(tmp))
        if args.init_from:
            try:
                tokenizer, text_encoder, vae, unet = load_models(args.init_from, tokenizer, args.quick, args.unet_size)
            except ValueError as error:
                parser.error(str(error))
        else:
            text_encoder, vae, unet = build_models(len(tokenizer), tokenizer, args.quick, args.unet_size)
    text_encoder, vae, unet = text_encoder.to(device), vae.to(device), unet.to(device)
    timings["data_s"] = time.time() - start
    budget = Budget(args.max_minutes, args.budget_shares, start)
    by_time = args.schedule_by == "time"
    command = " ".join(["python", "python/pretrain_tiny.py", *(sys.argv[1:] if argv is None else argv)])

    def decoder_generators():  # their own generators, so that --finetune-decoder on a saved pipeline gives the same weights
        cpu = torch.Generator().manual_seed(args.seed + 1)
        return cpu, (cpu if device.type == "cpu" else torch.Generator(device).manual_seed(args.seed + 1))

    if args.finetune_decoder:
        pipe = embedded.load_pipeline(path=args.out).to(device)
        clock = Clock(args.decoder_steps, budget.deadline("decoder"), by_time=by_time)
        d_gen, d_noise = decoder_generators()
        decoder_loss = finetune_decoder(pipe.vae, images, *encode(pipe.vae, images), args.decoder_steps,
                                        args.decoder_batch, args.lr, d_gen, clock=clock, noise_gen=d_noise, bf16=args.bf16)
        pipe.to("cpu").save_pretrained(args.out, safe_serialization=True)
        # Appended to the folder's own record, which describes the rest of the pipeline.
        record = {"command": command, "seed": args.seed, "scenes": args.scenes, "lr": args.lr,
                  "batch": args.decoder_batch, "decoder": clock.record(), "decoder_loss": decoder_loss,
                  "device": device_name, "torch": torch.__version__, "total_s": time.time() - start}
        report = previous_record(args.out) or {}
        report["decoder_finetunes"] = [*report.get("decoder_finetunes", []), record]
        (Path(args.out) / "training.json").write_text(json.dumps(report, indent=1) + "\n")
        print(json.dumps(record))
        return

    stages = {}
    t0 = time.time()
    if args.vae_from:
        vae, vae_loss = AutoencoderKL.from_pretrained(args.vae_from, subfolder="vae").to(device), None
    elif args.init_from:  # loaded with the rest; its scaling_factor is kept, like --vae-from's
        vae_loss = None
    else:
        clock = Clock(args.vae_steps, budget.deadline("vae"), by_time=by_time)
        vae_loss = train_vae(vae, images, args.vae_steps, args.vae_batch, args.lr, gen, crop=args.vae_crop,
                             clock=clock, noise_gen=noise_gen, bf16=args.bf16)
        stages["vae"] = clock.record()
    vae.eval().requires_grad_(False)
    means, stds = encode(vae, images, batch=256 if device.type == "cpu" else 2048)
    if not (args.vae_from or args.init_from):  # unit-variance latents, as Stable Diffusion's scaling_factor gives
        vae.register_to_config(scaling_factor=1.0 / means.std().item())
    scale = vae.config.scaling_factor
    means, stds = means * scale, stds * scale
    timings["vae_s"] = time.time() - t0

    scheduler = DDIMScheduler(**SCHEDULE, set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    settings = {"seed": args.seed, "command": command, "device": device_name, "unet_size": args.unet_size,
                "offset_noise": args.offset_noise, "object_weight": args.object_weight, "snr_gamma": args.snr_gamma,
                "max_minutes": args.max_minutes, "budget_shares": list(args.budget_shares) if args.max_minutes else None,
                "schedule_by": args.schedule_by if args.max_minutes else "steps", "bf16": args.bf16,
                "torch": torch.__version__}
    if args.vae_from:  # the VAE's own training is in that folder's record
        settings.update(vae_from=str(args.vae_from), vae_previous=previous_record(args.vae_from))
    if args.init_from:
        previous = previous_record(args.init_from)
        settings.update(init_from=str(args.init_from), previous=previous)

    judged = []  # the learning curve, with --judge-every-save

    def save(step):  # safetensors copies CUDA tensors to the CPU itself
        pipe.save_pretrained(args.out, safe_serialization=True)
        if args.judge_every_save:
            modes = unet.training, text_encoder.training
            unet.eval(), text_encoder.eval()
            rates = judge_samples(pipe, args.judge_every_save, embedded.GUIDANCE_SCALE, embedded.NUM_INFERENCE_STEPS,
                                  args.seed + 1000)[2]
            unet.train(modes[0]), text_encoder.train(modes[1])
            judged.append({"unet_step": step, "seconds": round(time.time() - start, 1), **rates})
            print(f"step {step}: judged {args.judge_every_save} samples: {rates}", flush=True)
        (Path(args.out) / "training.json").write_text(json.dumps({"unet_step": step, "stages": stages, "judged": judged,
                                                                  **settings}) + "\n")

    t0 = time.time()

    def token_ids(texts):
        return tokenizer(texts, padding="max_length", max_length=embedded.TEXT_LENGTH, truncation=True,
                         return_tensors="pt").input_ids.to(device)

    clock = Clock(args.unet_steps, budget.deadline("unet"), args.unet_stop, by_time=by_time)
    warmup = args.unet_warmup
    if warmup is None and args.init_from:  # a short warm-up: the weights are trained, the optimiser state is new
        warmup = min(100, args.unet_steps // 10 + 1)
    pixel_weights = None
    if args.object_weight:  # 1 on background, 1 + w on object pixels, averaged down to the latent grid
        covered = F.avg_pool2d(object_pixels[:, None].float(), embedded.IMAGE_SIZE // means.shape[-1])
        pixel_weights = (1 + args.object_weight * covered).to(device)
    del object_pixels
    unet_loss = train_unet(unet, text_encoder, token_ids(captions), token_ids([""])[0], means, stds,
                           args.unet_steps, args.unet_batch, args.lr, gen, args.ema, save, args.save_every,
                           args.unet_stop, offset_noise=args.offset_noise, clock=clock, noise_gen=noise_gen,
                           bf16=args.bf16, warmup=warmup, ema_warmup=not args.init_from, pixel_weights=pixel_weights,
                           snr_gamma=args.snr_gamma)
    stages["unet"] = clock.record()
    unet.eval()
    text_encoder.eval()
    if args.max_minutes is not None or args.save_every:
        save(clock.done)  # a usable pipeline (EMA weights) even if the decoder stage never ends
    timings["unet_s"] = time.time() - t0

    t0 = time.time()
    decoder_loss = None
    if args.decoder_steps:
        clock = Clock(args.decoder_steps, budget.deadline("decoder"), by_time=by_time)
        d_gen, d_noise = decoder_generators()
        decoder_loss = finetune_decoder(vae, images, means / scale, stds / scale, args.decoder_steps,
                                        args.decoder_batch, args.lr, d_gen, clock=clock, noise_gen=d_noise,
                                        bf16=args.bf16)
        stages["decoder"] = clock.record()
    timings["decoder_s"] = time.time() - t0
    t0 = time.time()
    pipe.to("cpu").save_pretrained(args.out, safe_serialization=True)
    timings["save_s"] = time.time() - t0
    size = sum(f.stat().st_size for f in Path(args.out).rglob("*.safetensors"))
    trained_vae = "vae" in stages  # else the VAE's record is under vae_previous / previous
    report = {"scenes": args.scenes, "vae_steps": args.vae_steps if trained_vae else None, "unet_steps": args.unet_steps,
              "unet_stop": args.unet_stop, "vae_loss": vae_loss, "unet_loss": unet_loss,
              "decoder_steps": args.decoder_steps, "decoder_loss": decoder_loss, "scaling_factor": scale,
              "safetensors_mb": size / 1e6, "threads": args.threads,
              "batches": {"vae": args.vae_batch if trained_vae else None, "vae_crop": args.vae_crop if trained_vae else None,
                          "unet": args.unet_batch,
                          "decoder": args.decoder_batch},
              "lr": args.lr, "ema": args.ema, "stages": stages, "judged": judged, **settings,
              "total_s": time.time() - start, **{k: round(v, 1) for k, v in timings.items()}}
    if args.init_from:
        report["unet_steps_total"] = _unet_steps_total(report)  # along the chain of "previous" records
    (Path(args.out) / "training.json").write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "previous"}))
