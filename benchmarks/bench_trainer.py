"""Trainer benchmarks at Stable Diffusion 1.5 scale: SD-1.5's UNet, VAE and text-encoder configs with random
weights, built in memory (timing does not depend on the weights; nothing is downloaded).

Three measurements, each writing long-format CSV rows (bench, algorithm, precision, batch, resolution, steps,
metric, value, unit) with the device, versions and date:

- ``microstep``: one training micro-step (UNet forward with classifier-free guidance, the fused loss, backward)
  for pxpo and ddpo on the same trainer and batch: median milliseconds over ``--reps``, and pxpo's extra cost.
- ``kl``: pxpo's micro-step without and with the KL penalty toward the initial model (``train_kl_coef``).
- ``epoch``: whole epochs (sampling with guidance, rewards, advantages, training on every timestep) at the
  settings of ``shared/anchors/trl_ddpo_throughput.py`` (50 steps, 2 x 8 samples, train batch 4, LoRA rank 4,
  fp16): seconds per epoch, samples per second (best epoch after the first) and peak GPU memory.
- ``scaling``: micro-step and sampling-step time and peak memory over batch size and image size, and whole
  epochs over the number of denoising steps.

With ``--compile MODE`` a ``gradcheck`` row comes first: the compiled UNet's gradient against the eager one on
one micro-step (relative difference; the trainer refuses to train above 5%).

    python benchmarks/bench_trainer.py --out benchmarks/results/trainer_h100.csv
    python benchmarks/bench_trainer.py --tiny --out /tmp/trainer_cpu.csv       # a CPU smoke run, tiny models
    python benchmarks/bench_trainer.py --embedded --device cpu ...             # the embedded model (what train.py trains)
    python benchmarks/bench_trainer.py --plot benchmarks/results/trainer_h100.csv --figure docs/figures/scaling.png
"""
from __future__ import annotations

import argparse
import csv
import datetime as dt
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import diffusers
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from pxpo_ext import embedded
from pxpo_ext.trainer import PXPOConfig, PXPOTrainer
from pxpo_ext.trainer.config import COMPILE_MODES, COMPILE_SCOPES
from pxpo_ext.trainer.sampling import TextConditioning, sample

DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def build_pipeline(model: str, device: str, dtype: torch.dtype) -> StableDiffusionPipeline:
    """``model`` "sd15": SD-1.5's architecture with random weights, initialised on ``device``; "tiny": a tiny
    one likewise; "sdxl" and "tiny-sdxl": SDXL 1.0 base's architecture and a tiny one; "embedded": pxpo's
    shipped model (``python python/train.py``'s default), loaded."""
    if model == "embedded":
        return embedded.load_pipeline(device, dtype)
    if model.endswith("sdxl"):
        return build_sdxl_pipeline(model == "tiny-sdxl", device, dtype)
    torch.manual_seed(0)
    with torch.device(device):
        if model == "tiny":
            unet = UNet2DConditionModel(sample_size=8, block_out_channels=(32, 64), layers_per_block=1,
                                        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=32,
                                        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
            vae = AutoencoderKL(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                                up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, layers_per_block=1,
                                norm_num_groups=32)
            text = CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  vocab_size=1000, max_position_embeddings=77)
        else:  # the configs of runwayml/stable-diffusion-v1-5
            unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8,
                                        block_out_channels=(320, 640, 1280, 1280))
            vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                                up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, layers_per_block=2,
                                sample_size=512, scaling_factor=0.18215)
            text = CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                  num_attention_heads=12, vocab_size=49408, max_position_embeddings=77)
        text_encoder = CLIPTextModel(text)
    # Any CLIP tokenizer does for timing; SD's 77 positions keep the cross-attention at SD's size.
    tokenizer = CLIPTokenizer.from_pretrained(embedded.pipeline_path() / "tokenizer", model_max_length=77)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device, dtype)


def build_sdxl_pipeline(tiny: bool, device: str, dtype: torch.dtype) -> StableDiffusionXLPipeline:
    """SDXL 1.0 base's architecture (the configs of stabilityai/stable-diffusion-xl-base-1.0) with random weights,
    or a tiny one of the same shape (two text encoders, pooled embedding and time ids)."""
    torch.manual_seed(0)
    with torch.device(device):
        if tiny:
            unet = UNet2DConditionModel(sample_size=8, block_out_channels=(32, 64), layers_per_block=1,
                                        cross_attention_dim=64, attention_head_dim=(2, 4), norm_num_groups=32,
                                        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), use_linear_projection=True,
                                        addition_embed_type="text_time", addition_time_embed_dim=8,
                                        projection_class_embeddings_input_dim=6 * 8 + 16)
            vae = AutoencoderKL(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                                up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, layers_per_block=1,
                                norm_num_groups=32)
            small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         vocab_size=1000, max_position_embeddings=77)
            text, text_2 = CLIPTextConfig(**small), CLIPTextConfig(**small, projection_dim=16)
        else:
            unet = UNet2DConditionModel(sample_size=128, block_out_channels=(320, 640, 1280), layers_per_block=2,
                                        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                                        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                                        attention_head_dim=(5, 10, 20), transformer_layers_per_block=(1, 2, 10),
                                        cross_attention_dim=2048, use_linear_projection=True,
                                        addition_embed_type="text_time", addition_time_embed_dim=256,
                                        projection_class_embeddings_input_dim=2816)
            vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                                up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, layers_per_block=2,
                                sample_size=1024, scaling_factor=0.13025, force_upcast=True)
            text = CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                                  vocab_size=49408, max_position_embeddings=77)
            text_2 = CLIPTextConfig(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                                    num_attention_heads=20, vocab_size=49408, max_position_embeddings=77,
                                    projection_dim=1280, hidden_act="gelu")
        text_encoder, text_encoder_2 = CLIPTextModel(text), CLIPTextModelWithProjection(text_2)
    tokenizer = CLIPTokenizer.from_pretrained(embedded.pipeline_path() / "tokenizer", model_max_length=77)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                     tokenizer=tokenizer, tokenizer_2=tokenizer, unet=unet, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device, dtype)  # the trainer keeps SDXL's VAE in float32 under fp16 (force_upcast)


def brightness_map(images, prompts, metadata):
    """A per-pixel reward (ddpo averages it to one scalar per image, as TRL's anchor reward is)."""
    return images.float().mean(dim=1)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


class Recorder:
    """Long-format CSV rows with the machine and versions; prints each row as it comes, with the seconds since
    the recorder was made."""

    def __init__(self, path: str, device: str):
        self.path, self.device, self.start = path, device, time.perf_counter()
        self.machine = torch.cuda.get_device_name() if device == "cuda" else f"cpu x{torch.get_num_threads()}"

    def __call__(self, bench: str, metric: str, value: float, unit: str, **setting) -> None:
        row = dict(date=dt.date.today().isoformat(), device=self.machine, torch=torch.__version__,
                   diffusers=diffusers.__version__, bench=bench, algorithm=setting.get("algorithm", ""),
                   precision=setting.get("precision", ""), batch=setting.get("batch", ""),
                   resolution=setting.get("resolution", ""), steps=setting.get("steps", ""),
                   variant=setting.get("variant", ""), metric=metric, value=float(f"{value:.6g}"), unit=unit)
        # The time since the start, so that a run cut short still shows how long each stage took.
        print(f"[{time.perf_counter() - self.start:.0f}s]", *(f"{k}={v}" for k, v in row.items()
                                                           if k not in ("date", "device", "torch", "diffusers")),
              flush=True)
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        new = not os.path.exists(self.path)
        with open(self.path, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(row))
            if new:
                writer.writeheader()
            writer.writerow(row)


def variant_name(args) -> str:
    """The CSV's variant column for the model and the trainer's own settings ("" for the plain eager trainer on
    SD-1.5's architecture)."""
    parts = ["sdxl"] if args.sdxl else []
    if args.compile != "no":
        parts.append(f"compile={args.compile}" + ("" if args.compile_scope == "unet" else f" scope={args.compile_scope}"))
    return " ".join(parts)


def make_trainer(pipe, device: str, **overrides) -> PXPOTrainer:
    settings = dict(sample_num_steps=50, sample_batch_size=8, sample_num_batches_per_epoch=2, train_batch_size=4,
                    mixed_precision="fp16", num_eval_images=0, log_images_every=0, save_freq=0, use_tensorboard=False,
                    per_prompt_stat_tracking=False, prompts="text:a photo of a cat",
                    output_dir=tempfile.mkdtemp(prefix="pxpo-bench-"))
    settings.update(overrides)
    return PXPOTrainer(PXPOConfig(**settings), reward_fn=brightness_map, pipeline=pipe)


def synthetic_batch(trainer: PXPOTrainer, batch: int, num_steps: int) -> dict:
    """A training minibatch shaped like rollouts (values do not change the work done)."""
    dev = trainer.accelerator.device
    c, h, w = trainer.latent_shape
    embeds = TextConditioning.cat([trainer.negative_embeds] * batch)  # rows of their own, as in rollouts
    timesteps = trainer.scheduler.timesteps.to(dev).long().unsqueeze(0).expand(batch, -1).contiguous()
    gran = trainer.config.logprob_granularity
    logp_shape = {"mean": (batch, num_steps), "pixel": (batch, num_steps, h, w)}.get(gran, (batch, num_steps, c, h, w))
    adv_shape = (batch,) if gran == "mean" else (batch, h, w)
    return {"embeds": embeds, "latents": torch.randn(batch, num_steps + 1, c, h, w, device=dev),
            "log_probs": torch.zeros(logp_shape, device=dev), "timesteps": timesteps,
            "advantages": torch.randn(adv_shape, device=dev),
            "weights": None if gran == "mean" else torch.ones(batch, h, w, device=dev)}


def _microstep_ms(trainer: PXPOTrainer, data: dict, index: torch.Tensor, device: str) -> float:
    """Milliseconds of one micro-step (forward, loss, backward); gradients are cleared afterwards."""
    sync(device)
    t0 = time.perf_counter()
    trainer.backward_timestep(data, index)
    sync(device)
    elapsed = time.perf_counter() - t0
    trainer.optimizer.zero_grad(set_to_none=True)
    return 1e3 * elapsed


def time_microstep(trainer: PXPOTrainer, batch: int, reps: int, device: str, warmup: int = 2) -> float:
    """Median milliseconds of one micro-step of ``trainer``'s algorithm."""
    steps = len(trainer.scheduler.timesteps)
    data = synthetic_batch(trainer, batch, steps)
    index = torch.full((batch,), steps // 2, device=trainer.accelerator.device)
    times = [_microstep_ms(trainer, data, index, device) for _ in range(warmup + reps)]
    return statistics.median(times[warmup:])


def time_sampling_step(trainer: PXPOTrainer, batch: int, device: str, steps: int = 5) -> float:
    """Milliseconds per guided sampling step (UNet, DDIM step, log-prob), best of two runs after a warm-up."""
    unet, dev = trainer._unwrapped_unet, trainer.accelerator.device
    x = torch.randn(batch, *trainer.latent_shape, device=dev)
    embeds = TextConditioning.cat([trainer.negative_embeds] * batch)  # rows of their own, as in rollouts
    times = []
    for _ in range(3):
        sync(device)
        t0 = time.perf_counter()
        with trainer.accelerator.autocast():
            sample(unet, trainer.pipeline.vae, trainer.scheduler, embeds, trainer.negative_embeds, x,
                   num_steps=steps, eta=1.0, guidance_scale=5.0, granularity="pixel",
                   generator=torch.Generator().manual_seed(0), dtype=trainer.weight_dtype)
        sync(device)
        times.append(time.perf_counter() - t0)
    return 1e3 * min(times[1:]) / steps


def _gpu_busy_ms(trainer: PXPOTrainer, data: dict, index: torch.Tensor, reps: int) -> float:
    """Summed kernel time of one micro-step (profiler): unlike wall time, idle gaps and clock jitter between
    launches do not count, so two algorithms that launch the same UNet kernels compare closely."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            trainer.backward_timestep(data, index)
            trainer.optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    return sum(e.device_time for e in kernels) / reps / 1e3


def _alternating_ms(trainer: PXPOTrainer, data: dict, index: torch.Tensor, args, configure) -> dict[str, list[float]]:
    """Micro-step milliseconds of each setting named in ``data`` (``configure(name)`` sets it), taken in turn
    step by step so that clock drift hits all alike: ``--reps`` of each after two warm-up rounds."""
    names = list(data)
    times = {name: [] for name in names}
    for i in range(len(names) * (args.reps + 2)):
        name = names[i % len(names)]
        configure(name)
        ms = _microstep_ms(trainer, data[name], index, args.device)
        if i >= 2 * len(names):
            times[name].append(ms)
    return times


def bench_microstep(record: Recorder, trainer: PXPOTrainer, args) -> None:
    """pxpo and ddpo on one trainer, alternating step by step so that clock drift hits both alike; only the
    log-prob unit and the loss differ between them. Wall time: median and quartiles over ``--reps`` steps of
    each; on a GPU also the summed kernel time per step from the profiler."""
    precision, batch = trainer.config.mixed_precision, args.train_batch
    steps = len(trainer.scheduler.timesteps)
    index = torch.full((batch,), steps // 2, device=trainer.accelerator.device)
    setting = dict(precision=precision, batch=batch, resolution=trainer.image_size, variant=variant_name(args))
    data = {}
    for algorithm in ("ddpo", "pxpo"):
        trainer.config.algorithm = algorithm  # backward_timestep reads granularity and clip range from it
        data[algorithm] = synthetic_batch(trainer, batch, steps)
    times = _alternating_ms(trainer, data, index, args, lambda a: setattr(trainer.config, "algorithm", a))
    for algorithm, values in times.items():
        q1, median, q3 = statistics.quantiles(values, n=4) if len(values) > 1 else values * 3
        record("microstep", "ms_per_microstep", median, "ms", algorithm=algorithm, **setting)
        record("microstep", "ms_per_microstep_q1", q1, "ms", algorithm=algorithm, **setting)
        record("microstep", "ms_per_microstep_q3", q3, "ms", algorithm=algorithm, **setting)
    overhead = 100 * (statistics.median(times["pxpo"]) / statistics.median(times["ddpo"]) - 1)
    record("microstep", "pxpo_extra_cost", overhead, "%", algorithm="pxpo", **setting)
    if args.device == "cuda":
        busy = {}
        for algorithm in times:
            trainer.config.algorithm = algorithm
            busy[algorithm] = _gpu_busy_ms(trainer, data[algorithm], index, max(3, args.reps // 4))
            record("microstep", "gpu_busy_ms_per_microstep", busy[algorithm], "ms", algorithm=algorithm, **setting)
        record("microstep", "pxpo_extra_gpu_busy", 100 * (busy["pxpo"] / busy["ddpo"] - 1), "%", algorithm="pxpo",
               **setting)
    trainer.config.algorithm = "pxpo"


def bench_kl(record: Recorder, trainer: PXPOTrainer, args) -> None:
    """pxpo's micro-step without and with the KL penalty toward the initial model (``train_kl_coef``; its cost is
    one more UNet forward, without gradient, with the LoRA adapters off), alternating step by step as above."""
    batch, steps = args.train_batch, len(trainer.scheduler.timesteps)
    index = torch.full((batch,), steps // 2, device=trainer.accelerator.device)
    setting = dict(precision=trainer.config.mixed_precision, batch=batch, resolution=trainer.image_size,
                   variant=variant_name(args))
    trainer.config.algorithm = "pxpo"
    data = synthetic_batch(trainer, batch, steps)
    # backward_timestep reads the coefficient on every call
    times = _alternating_ms(trainer, {"pxpo": data, "pxpo+kl": data}, index, args,
                            lambda name: setattr(trainer.config, "train_kl_coef", 0.1 if name == "pxpo+kl" else 0.0))
    trainer.config.train_kl_coef = 0.0
    for name, values in times.items():
        record("kl", "ms_per_microstep", statistics.median(values), "ms", algorithm=name, **setting)
    extra = 100 * (statistics.median(times["pxpo+kl"]) / statistics.median(times["pxpo"]) - 1)
    record("kl", "kl_extra_cost", extra, "%", algorithm="pxpo+kl", **setting)


def record_compiled_gradient(record: Recorder, trainer: PXPOTrainer, args) -> None:
    """The trainer's own check of the compiled UNet's gradient against the eager one, recorded as a row, so
    that every compiled timing comes with the evidence that the compiled graph computes the right thing. A
    difference over the trainer's 5% tolerance is recorded and warned about instead of stopping the timings."""
    steps = len(trainer.scheduler.timesteps)
    data = synthetic_batch(trainer, args.train_batch, steps)
    index = torch.full((args.train_batch,), steps // 2, device=trainer.accelerator.device)
    difference = trainer.check_compiled_gradient(data, index, tolerance=float("inf"))  # still raises on NaN
    record("gradcheck", "compiled_gradient_rel_diff", difference, "", algorithm=trainer.config.algorithm,
           precision=trainer.config.mixed_precision, batch=args.train_batch, resolution=trainer.image_size,
           variant=variant_name(args))
    if difference > 0.05:
        print(f"WARNING: the compiled gradient differs from the eager one by {difference:.1%}; the trainer would "
              "refuse to train with this compile_unet, and the timings below are of a wrong graph", flush=True)


def bench_variants(record: Recorder, trainer: PXPOTrainer, args) -> None:
    """pxpo micro-step and sampling-step time with channels-last UNet weights and cuDNN autotuning, each on
    and off: two common knobs, measured before deciding whether the trainer should turn them on."""
    precision = trainer.config.mixed_precision
    unet = trainer._unwrapped_unet
    for channels_last in (False, True):
        unet.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        for autotune in (False, True):
            torch.backends.cudnn.benchmark = autotune
            variant = f"channels_last={int(channels_last)} cudnn_benchmark={int(autotune)}"
            ms = time_microstep(trainer, args.train_batch, args.reps, args.device, warmup=3)
            record("variants", "ms_per_microstep", ms, "ms", algorithm="pxpo", precision=precision,
                   batch=args.train_batch, resolution=trainer.image_size, variant=variant)
            batch = trainer.config.sample_batch_size
            record("variants", "ms_per_sampling_step", time_sampling_step(trainer, batch, args.device), "ms",
                   algorithm="pxpo", precision=precision, batch=batch, resolution=trainer.image_size, steps=5,
                   variant=variant)
    unet.to(memory_format=torch.contiguous_format)
    torch.backends.cudnn.benchmark = False
    trainer.scheduler.set_timesteps(trainer.config.sample_num_steps)


def bench_epochs(record: Recorder, trainer: PXPOTrainer, epochs: int, device: str, variant: str = "",
                 bench: str = "epoch") -> None:
    c = trainer.config
    setting = dict(algorithm=c.algorithm, precision=c.mixed_precision, batch=c.sample_batch_size,
                   resolution=trainer.image_size, steps=c.sample_num_steps, variant=variant)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for epoch in range(epochs):
        sync(device)
        t0 = time.perf_counter()
        trainer.step(epoch)
        sync(device)
        times.append(time.perf_counter() - t0)
        record(bench, "epoch_s", times[-1], "s", **setting)
        if device == "cuda":  # the peak so far, after every epoch: a run cut short by a time limit keeps it
            record(bench, "peak_memory", torch.cuda.max_memory_allocated() / 1e9, "GB", **setting)
    best = min(times[1:]) if len(times) > 1 else times[0]
    record(bench, "samples_per_s", trainer.samples_per_epoch / best, "samples/s", **setting)


def bench_scaling(record: Recorder, trainer: PXPOTrainer, args) -> None:
    """Micro-step time and memory over train batch and image size; sampling-step time over sample batch."""
    precision = trainer.config.mixed_precision
    base, factor = trainer.latent_size, trainer.image_size // trainer.latent_size
    for latent, batches in ((base, args.scaling_batches),
                            *((side // factor, [args.train_batch]) for side in args.scaling_sizes)):
        trainer.latent_size, trainer.image_size = latent, latent * factor
        trainer.latent_shape = (trainer.latent_shape[0], latent, latent)
        for batch in batches:
            if args.device == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            ms = time_microstep(trainer, batch, max(3, args.reps // 2), args.device)
            setting = dict(algorithm="pxpo", precision=precision, batch=batch, resolution=latent * factor)
            record("scaling", "ms_per_microstep", ms, "ms", **setting)
            if args.device == "cuda":
                record("scaling", "microstep_peak_memory", torch.cuda.max_memory_allocated() / 1e9, "GB", **setting)
    trainer.latent_size, trainer.image_size = base, base * factor
    trainer.latent_shape = (trainer.latent_shape[0], base, base)
    steps = 5
    for batch in args.scaling_batches:
        if args.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        ms = time_sampling_step(trainer, batch, args.device, steps)
        setting = dict(algorithm="pxpo", precision=precision, batch=batch, resolution=base * factor, steps=steps)
        record("scaling", "ms_per_sampling_step", ms, "ms", **setting)
        if args.device == "cuda":
            record("scaling", "sampling_peak_memory", torch.cuda.max_memory_allocated() / 1e9, "GB", **setting)


def plot(csv_path: str, figure: str) -> None:
    """Scaling rows of ``csv_path`` as a figure: time and memory against batch size and image size, and epoch
    time against denoising steps where the CSV has those rows."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(csv_path, newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["bench"] == "scaling"]
    if not rows:
        raise SystemExit(f"{csv_path} holds no scaling rows")
    base = max(int(r["resolution"]) for r in rows if r["metric"] == "ms_per_sampling_step")
    steps = {}  # denoising steps -> best epoch time (the first epoch of each warms up)
    for r in rows:
        if r["metric"] == "epoch_s":
            steps[int(r["steps"])] = min(float(r["value"]), steps.get(int(r["steps"]), float("inf")))
    memory = [(metric, label) for metric, label in (("microstep_peak_memory", "training micro-step"),
                                                    ("sampling_peak_memory", "sampling"))
              if any(r["metric"] == metric for r in rows)]  # GPU runs only
    panels = 2 + bool(memory) + bool(steps)
    fig, axes = plt.subplots(1, panels, figsize=(4.3 * panels, 3.6))
    axes = iter(axes)
    ax = next(axes)
    for metric, label in (("ms_per_microstep", "training micro-step"), ("ms_per_sampling_step", "sampling step")):
        pts = sorted((int(r["batch"]), float(r["value"])) for r in rows
                     if r["metric"] == metric and int(r["resolution"]) == base)
        ax.plot(*zip(*pts), "o-", label=label)
    ax.set(xlabel="batch", ylabel="ms", title=f"time vs batch ({base} px)", xscale="log", yscale="log")
    ax.legend()
    if memory:
        ax = next(axes)
        for metric, label in memory:
            pts = sorted((int(r["batch"]), float(r["value"])) for r in rows
                         if r["metric"] == metric and int(r["resolution"]) == base)
            ax.plot(*zip(*pts), "o-", label=label)
        ax.set(xlabel="batch", ylabel="peak GB", title="peak GPU memory vs batch")
        ax.legend()
    ax = next(axes)
    sizes = sorted({int(r["resolution"]) for r in rows if r["metric"] == "ms_per_microstep"})
    batch = min(int(r["batch"]) for r in rows if r["metric"] == "ms_per_microstep" and int(r["resolution"]) != base) \
        if len(sizes) > 1 else None
    if batch is not None:
        pts = sorted((int(r["resolution"]), float(r["value"])) for r in rows
                     if r["metric"] == "ms_per_microstep" and int(r["batch"]) == batch)
        ax.plot(*zip(*pts), "o-")
        ax.set(xlabel="image side (px)", ylabel="ms", title=f"micro-step vs image size (batch {batch})")
    if steps:
        ax = next(axes)
        ax.plot(*zip(*sorted(steps.items())), "o-")
        ax.set(xlabel="denoising steps", ylabel="s", title="epoch time vs steps (best epoch)", xlim=(0, None),
               ylim=(0, None))
    fig.suptitle(f"{rows[0]['device']}, torch {rows[0]['torch']}, {rows[0]['date']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(figure, dpi=110)
    print(f"wrote {figure}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true", help="tiny models, 4 steps: a smoke run that fits a CPU")
    p.add_argument("--embedded", action="store_true",
                   help="the shipped embedded model at 64 px with the trainer's default 10 steps: what "
                        "python/train.py trains, on a CPU")
    p.add_argument("--sdxl", action="store_true",
                   help="SDXL 1.0 base's architecture with random weights at 1024 px (with --tiny: a tiny SDXL), "
                        "20 steps, 4 samples per epoch, training minibatches of 2: a check that SDXL trains at "
                        "scale and what its steps cost, not TRL's anchor settings")
    p.add_argument("--benches", nargs="+", default=["microstep", "epoch", "scaling"],
                   choices=["microstep", "variants", "kl", "epoch", "scaling"])
    p.add_argument("--precision", default="fp16" if torch.cuda.is_available() else "no", choices=list(DTYPES),
                   help="mixed precision (TRL's anchor: fp16; a CPU needs 'no')")
    p.add_argument("--epochs", type=int, default=3, help="pxpo epochs timed (the first one warms up)")
    p.add_argument("--ddpo-epochs", type=int, default=2, help="ddpo epochs timed by the same trainer code")
    p.add_argument("--train-batch", type=int, help="training minibatch (default 4; 2 with --tiny or --sdxl)")
    p.add_argument("--reps", type=int, default=10, help="timed micro-steps per measurement")
    p.add_argument("--scaling-batches", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    p.add_argument("--scaling-sizes", type=int, nargs="+", default=[256, 768], help="image sides besides the base")
    p.add_argument("--scaling-steps", type=int, nargs="*", default=[10, 25],
                   help="denoising step counts timed as whole epochs (besides the base 50, which --benches epoch times)")
    p.add_argument("--compile", default="no", choices=COMPILE_MODES, help="the trainer's compile_unet setting")
    p.add_argument("--compile-scope", default="unet", choices=COMPILE_SCOPES, help="the trainer's compile_scope")
    p.add_argument("--out", default="benchmarks/results/trainer.csv")
    p.add_argument("--plot", metavar="CSV", help="only draw the scaling figure of this CSV")
    p.add_argument("--figure", default="docs/figures/trainer_scaling.png")
    args = p.parse_args(argv)
    if args.plot:
        plot(args.plot, args.figure)
        return
    if args.embedded and (args.tiny or args.sdxl):
        p.error("--embedded is a model of its own; leave out --tiny and --sdxl")
    if args.tiny:
        args.scaling_batches, args.scaling_sizes, args.scaling_steps, args.reps = [1, 2], [32], [2], 2
    model = ("tiny-sdxl" if args.sdxl else "tiny") if args.tiny else "embedded" if args.embedded else \
        "sdxl" if args.sdxl else "sd15"
    steps = {"tiny": 4, "tiny-sdxl": 4, "embedded": PXPOConfig.sample_num_steps, "sd15": 50, "sdxl": 20}[model]
    dtype = DTYPES[args.precision]
    record = Recorder(args.out, args.device)
    t0 = time.perf_counter()
    pipe = build_pipeline(model, args.device, dtype)
    print(f"built the {model} pipeline in {time.perf_counter() - t0:.1f} s", flush=True)
    if args.train_batch is None:
        args.train_batch = 2 if args.tiny or args.sdxl else 4
    tiny = dict(sample_batch_size=2, sample_num_batches_per_epoch=1) if args.tiny else \
        dict(sample_batch_size=4, sample_num_batches_per_epoch=1) if args.sdxl else {}
    options = dict(sample_num_steps=steps, mixed_precision=args.precision, train_batch_size=args.train_batch,
                   compile_unet=args.compile, compile_scope=args.compile_scope, **tiny)
    trainer = make_trainer(pipe, args.device, **options)
    if args.compile != "no":
        record_compiled_gradient(record, trainer, args)
    if "microstep" in args.benches:
        bench_microstep(record, trainer, args)
    if "variants" in args.benches:
        bench_variants(record, trainer, args)
    if "kl" in args.benches:
        bench_kl(record, trainer, args)
    if "epoch" in args.benches:
        bench_epochs(record, trainer, args.epochs, args.device, variant_name(args))
    if "scaling" in args.benches:
        bench_scaling(record, trainer, args)
    trainer.close()
    if "epoch" in args.benches and args.ddpo_epochs:
        del trainer
        ddpo = make_trainer(build_pipeline(model, args.device, dtype), args.device, algorithm="ddpo", **options)
        bench_epochs(record, ddpo, args.ddpo_epochs, args.device, variant_name(args))
        ddpo.close()
    if "scaling" in args.benches:
        # Denoising steps: whole pxpo epochs (the first warms up), each step count on a fresh trainer (the
        # trainer's step tables are fixed at construction), so that the fixed per-epoch costs show too.
        for num_steps in args.scaling_steps:
            trainer = make_trainer(build_pipeline(model, args.device, dtype), args.device,
                                   **{**options, "sample_num_steps": num_steps})
            bench_epochs(record, trainer, 2, args.device, variant_name(args), bench="scaling")
            trainer.close()
            del trainer


if __name__ == "__main__":
    main()
