"""``PXPOTrainer``: the training loop of SPEC §6 over a diffusers Stable Diffusion or SDXL pipeline.

One code path serves ``algorithm="pxpo"`` (per-pixel log-probs, advantages and ratios) and
``"ddpo"`` (DDPO: per-image mean log-prob, scalar reward = the weighted mean of the map), so
the two compare on equal terms. Per epoch: sample with log-probs (rewards computed in worker
threads while the next batch samples), move reward maps to the latent grid, normalise them
into advantages, then train for ``train_num_inner_epochs`` passes with gradients accumulated
over timesteps. The maths lives in :mod:`pxpo_ext.ops` and :mod:`pxpo_ext.ddim`.
"""
from __future__ import annotations

import copy
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object, set_seed
from diffusers import DDIMScheduler, DiffusionPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline
from diffusers.optimization import get_scheduler
from tqdm.auto import tqdm

from ..ddim import ddim_mean_and_std
from ..ops import gaussian_kl, pxpo_loss_and_grad, reward_to_latent
from ..rewards import get_reward, normalize_output
from ..rewards.base import reward_name
from . import checkpoint as ckpt
from .advantages import StatTracker, image_rewards
from .config import PXPOConfig
from .lora import add_lora, save_lora
from .prompts import checked_prompt, get_prompt_fn
from .reporting import RunReporter
from .sampling import (
    TextConditioning,
    encode_prompts,
    guided_noise,
    initial_latents,
    needs_added_conditioning,
    negative_conditioning,
    sample,
    trainable_steps,
)

logger = logging.getLogger(__name__)

_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# Recompiles allowed per compiled code object with compile_scope="blocks" (13 needed at SD-1.5 scale).
BLOCK_RECOMPILE_LIMIT = 64


def cpu_distributed() -> bool:
    """Several processes without a GPU (torchrun or ``accelerate launch --cpu``): accelerate needs ``cpu=True``
    to pick its multi-CPU (gloo) mode, otherwise each process would train alone."""
    return not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1


def load_pipeline(model: str | None = None, device="cpu", dtype: torch.dtype = torch.float32):
    """The embedded pipeline (``model=None``) or a Stable Diffusion (1.x, 2.x) or SDXL diffusers folder / hub id,
    with a DDIM scheduler, on ``device`` in ``dtype``."""
    if model is None:
        from .. import embedded  # lazy: only the default model needs it

        pipe = embedded.load_pipeline(device, dtype)
    else:
        kind = DiffusionPipeline.load_config(model).get("_class_name")
        if kind == StableDiffusionXLPipeline.__name__:
            pipe = StableDiffusionXLPipeline.from_pretrained(model, dtype=dtype)
        elif kind == StableDiffusionPipeline.__name__:
            pipe = StableDiffusionPipeline.from_pretrained(model, dtype=dtype, safety_checker=None,
                                                           requires_safety_checker=False)
        else:
            raise ValueError(f"model {model!r} is a {kind}; pxpo trains StableDiffusionPipeline (SD 1.x, 2.x) and "
                             "StableDiffusionXLPipeline models")
    if not isinstance(pipe.scheduler, DDIMScheduler):
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    pipe.to(device)
    return pipe if pipe.unet.dtype == dtype else pipe.to(dtype=dtype)


def vae_dtype(pipe, weight_dtype: torch.dtype) -> torch.dtype:
    """The VAE's dtype in a run of ``weight_dtype``: float32 for an SDXL VAE that overflows in fp16 and says so
    (``force_upcast``), as diffusers' SDXL pipeline decodes; the run's dtype otherwise (SD 1.x VAEs carry the
    flag by default but their pipeline never upcasts)."""
    if weight_dtype == torch.float16 and needs_added_conditioning(pipe.unet) and pipe.vae.config.force_upcast:
        return torch.float32
    return weight_dtype


class PXPOTrainer:
    """Fine-tunes ``pipeline``'s UNet with PXPO or DDPO (see the module docstring).

    ``reward_fn(images (B, 3, H, W) in [0, 1], prompts, metadata)`` follows
    :mod:`pxpo_ext.rewards.base`; ``prompt_fn() -> (prompt, metadata)``; an int
    ``metadata["seed"]`` fixes that sample's initial noise. Any of the three left ``None`` comes
    from the config (``reward``, ``prompts``, ``model``).
    """

    def __init__(self, config: PXPOConfig, reward_fn=None, prompt_fn=None, pipeline=None):
        self.config = config
        c = config
        self.accelerator = Accelerator(mixed_precision=c.mixed_precision, cpu=cpu_distributed())
        acc = self.accelerator
        if acc.is_main_process:  # before any model loads: an unwritable run folder fails at once, clearly
            ckpt.check_writable(c.output_dir)
        set_seed(c.seed, device_specific=True)
        if c.allow_tf32 and torch.cuda.is_available():
            torch.backends.cuda.matmul.allow_tf32 = True
        self.weight_dtype = _DTYPES[c.mixed_precision]
        self.pipeline = pipeline if pipeline is not None else load_pipeline(c.model, acc.device, self.weight_dtype)
        self.reward_fn = reward_fn if reward_fn is not None else get_reward(c.reward, **c.reward_kwargs)
        self.reward_name = reward_name(self.reward_fn)
        self.prompt_fn = prompt_fn if prompt_fn is not None else get_prompt_fn(c.prompts, c.seed + acc.process_index)
        self.generator = torch.Generator().manual_seed(c.seed + acc.process_index)

        pipe = self.pipeline
        if not isinstance(pipe.scheduler, DDIMScheduler):
            pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        self.scheduler = pipe.scheduler
        unet = pipe.unet
        # Frozen weights in the run's precision; full fine-tuning trains float32 weights under autocast.
        encoders = [(m, self.weight_dtype) for m in (pipe.text_encoder, getattr(pipe, "text_encoder_2", None))
                    if m is not None]
        for module, dtype in ((pipe.vae, vae_dtype(pipe, self.weight_dtype)), *encoders,
                              (unet, self.weight_dtype if c.use_lora else torch.float32)):
            module.requires_grad_(False)
            module.to(acc.device)
            if module.dtype != dtype:
                module.to(dtype=dtype)
        if c.use_lora:
            params = add_lora(unet, c.lora_rank, c.lora_alpha)
        else:
            unet.requires_grad_(True)
            params = list(unet.parameters())
        self.trainable_names = [n for n, p in unet.named_parameters() if p.requires_grad]
        # The KL penalty's reference policy is the initial model: LoRA has it for free (adapters off), full
        # fine-tuning moves every weight, so it keeps a frozen copy in the run's precision.
        self.reference_unet = None
        if c.train_kl_coef > 0 and not c.use_lora:
            self.reference_unet = copy.deepcopy(unet).requires_grad_(False).to(dtype=self.weight_dtype).eval()

        if c.resolution is not None and c.resolution % pipe.vae_scale_factor:
            raise ValueError(f"resolution={c.resolution} must be a multiple of the VAE's factor {pipe.vae_scale_factor}")
        self.latent_size = (c.resolution or unet.config.sample_size * pipe.vae_scale_factor) // pipe.vae_scale_factor
        self.image_size = self.latent_size * pipe.vae_scale_factor
        self.latent_shape = (unet.config.in_channels, self.latent_size, self.latent_size)
        self.scheduler.set_timesteps(c.sample_num_steps)
        stochastic = trainable_steps(self.scheduler, c.sample_eta)
        self.train_step_indices = torch.nonzero(stochastic).flatten()
        if len(self.train_step_indices) == 0:
            raise ValueError("no sampling step is stochastic (sigma = 0 everywhere): nothing to train on")
        skipped = c.sample_num_steps - len(self.train_step_indices)
        if skipped:
            logger.warning("leaving %d deterministic sampling step(s) (sigma = 0, no density) out of training", skipped)
        self.skipped_steps = skipped
        self.timesteps_per_sample = max(1, int(len(self.train_step_indices) * c.train_timestep_fraction))
        # Every (minibatch, timestep) is one micro-step; an optimiser step takes whole trajectories.
        acc.gradient_accumulation_steps = c.train_gradient_accumulation_steps * self.timesteps_per_sample
        self.samples_per_epoch = c.sample_batch_size * c.sample_num_batches_per_epoch
        steps_per_epoch = self.samples_per_epoch // c.train_batch_size // c.train_gradient_accumulation_steps
        self.optimizer_steps_per_epoch = steps_per_epoch * c.train_num_inner_epochs

        optimizer = torch.optim.AdamW(params, lr=c.train_learning_rate, betas=(c.train_adam_beta1, c.train_adam_beta2),
                                      weight_decay=c.train_adam_weight_decay, eps=c.train_adam_epsilon)
        # Stepped by hand once per optimiser step (accelerate's wrapper would step it per process).
        self.lr_scheduler = get_scheduler(c.train_lr_scheduler, optimizer, num_warmup_steps=c.train_lr_warmup_steps,
                                          num_training_steps=c.num_epochs * self.optimizer_steps_per_epoch)
        # Wrap the UNet itself, the module every forward calls, so DDP averages its (LoRA) gradients.
        self.unet, self.optimizer = acc.prepare(unet, optimizer)
        self.params = params
        if c.compile_unet != "no":
            # In place, after LoRA and wrapping: every caller (sampling, training, DDP) runs the compiled forward and
            # parameter names stay those of the plain module.
            if c.compile_scope == "blocks":
                # Every instance of a repeated block shares one compiled code object, and each width, batch size and
                # gradient mode is a recompile of it: 13 at SD-1.5 scale, past dynamo's default limit of 8, after which
                # the blocks would silently run eager. Raise the limit (never lower it) rather than use dynamic
                # shapes, which still hit it and compile slower graphs.
                try:
                    unet.compile_repeated_blocks(mode=c.compile_unet, dynamic=False)
                except ValueError as error:  # diffusers' own check: no repeated blocks named, or none found
                    raise ValueError(f"compile_scope='blocks' needs a UNet that names its repeated blocks; "
                                     f"{type(unet).__name__} names none. Use compile_scope='unet' to compile it "
                                     f"whole (diffusers: {error})") from None
                torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, BLOCK_RECOMPILE_LIMIT)
            else:
                # Static shapes: sampling, training and evaluation each compile once for their own batch, which
                # beats one dynamic-shape graph for all three.
                unet.compile(mode=c.compile_unet, dynamic=False)
        self._compiled_gradient_unchecked = c.compile_unet != "no"

        self.tracker = StatTracker(c.per_prompt_stat_tracking, c.stat_buffer_size, c.stat_min_count,
                                   c.advantage_baseline, c.train_adv_clip_max, c.advantage_std_floor)
        with torch.no_grad():
            self.negative_embeds = negative_conditioning(pipe, acc.device, self.image_size, c.sample_negative_prompt)
        self.executor = ThreadPoolExecutor(max_workers=c.reward_workers)
        self.epoch = 0
        self.global_step = 0
        self.samples_seen = 0
        self.last_train_stats: list[dict] = []
        # Fixed before/after set, drawn before a resume restores the prompt stream, so it never shifts training.
        drawn = [checked_prompt(self.prompt_fn(), self.prompt_fn) for _ in range(c.num_eval_images)]
        self.eval_prompts = [p for p, _ in drawn]
        self.eval_seeds = list(range(c.num_eval_images))
        # The prompts' metadata goes to the reward with them (a reward may need it); the seed is the grid's own.
        self.eval_metadata = [{**m, "seed": s} for (_, m), s in zip(drawn, self.eval_seeds)]
        if c.resume_from:
            self._resume(c.resume_from)
        self.reporter = RunReporter(c.output_dir, use_tensorboard=c.use_tensorboard, enabled=acc.is_main_process)

    # ------------------------------------------------------------------ sampling and rewards
    @property
    def _unwrapped_unet(self):
        return self.accelerator.unwrap_model(self.unet)

    def _guidance(self, training: bool) -> float | None:
        c = self.config
        return None if c.sample_guidance_scale == 1.0 or (training and not c.train_cfg) else c.sample_guidance_scale

    @torch.no_grad()
    def generate(self, prompts: list[str], seeds: list[int], num_steps: int | None = None) -> torch.Tensor:
        """Images (B, 3, H, W) in [0, 1] under the current weights; the same seeds give the same images.

        Each image's generator, seeded with its seed, draws its initial noise (as a prompt's
        ``metadata["seed"]`` does in training) and then its step noise, so an image does not
        depend on the others in the batch.
        """
        if len(prompts) != len(seeds):
            raise ValueError(f"need one seed per prompt, got {len(prompts)} prompts and {len(seeds)} seeds")
        dev = self.accelerator.device
        generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
        x_t = torch.cat([initial_latents(self.latent_shape, [None], g, dev) for g in generators])
        embeds = encode_prompts(self.pipeline, list(prompts), dev, self.image_size)
        with self.accelerator.autocast():
            *_, images = sample(self._unwrapped_unet, self.pipeline.vae, self.scheduler, embeds, self.negative_embeds,
                                x_t, num_steps=num_steps or self.config.sample_num_steps, eta=self.config.sample_eta,
                                guidance_scale=self.config.sample_guidance_scale,
                                granularity=self.config.logprob_granularity, generator=generators,
                                dtype=self.weight_dtype)
        return images

    def _rewards(self, future, prompts):
        """Reward maps at image resolution and at the latent grid, from a worker's result."""
        out = normalize_output(future.result(), self.reward_name, len(prompts), (self.image_size, self.image_size))
        r_lat, w_lat = reward_to_latent(out.reward, self.latent_size, out.weight, source=self.reward_name)
        return out, r_lat, w_lat

    def _sampling_noise(self, seeds: list[int | None], metadata: list[dict]):
        """Initial latents and the step-noise generator(s) of one sampling batch.

        ``metadata["seed"]`` fixes a sample's initial noise. With ``metadata["same_trajectory"]`` too, its step
        noise also comes from that seed's generator, exactly as in :meth:`generate`: the sample is the image a
        person saw, so feedback given on that image (the same marks for every sample) scores the very trajectory
        it was given for. Without it, fixed marks would be independent of the sampled actions and their
        expected gradient would be zero.
        """
        dev = self.accelerator.device
        replay = [s is not None and bool(m.get("same_trajectory")) for s, m in zip(seeds, metadata)]
        if not any(replay):
            return initial_latents(self.latent_shape, seeds, self.generator, dev), self.generator
        gens = [torch.Generator().manual_seed(int(s)) if r else
                torch.Generator().manual_seed(int(torch.randint(2**62, (1,), generator=self.generator)))
                for s, r in zip(seeds, replay)]
        rows = [initial_latents(self.latent_shape, [None] if r else [s], g if r else self.generator, dev)
                for s, r, g in zip(seeds, replay, gens)]
        return torch.cat(rows), gens

    def sample_epoch(self) -> dict:
        """Sample this process's rollouts; rewards run in worker threads while the next batch samples."""
        c = self.config
        batches, futures = [], []
        for _ in range(c.sample_num_batches_per_epoch):
            drawn = [checked_prompt(self.prompt_fn(), self.prompt_fn) for _ in range(c.sample_batch_size)]
            prompts = [p for p, _ in drawn]
            metadata = [m for _, m in drawn]
            seeds = [m["seed"] if isinstance(m.get("seed"), int) else None for m in metadata]
            x_t, step_generator = self._sampling_noise(seeds, metadata)
            embeds = encode_prompts(self.pipeline, prompts, self.accelerator.device, self.image_size)
            with torch.no_grad(), self.accelerator.autocast():
                latents, log_probs, timesteps, images = sample(
                    self._unwrapped_unet, self.pipeline.vae, self.scheduler, embeds, self.negative_embeds, x_t,
                    num_steps=c.sample_num_steps, eta=c.sample_eta, guidance_scale=c.sample_guidance_scale,
                    granularity=c.logprob_granularity, generator=step_generator, dtype=self.weight_dtype)
            futures.append(self.executor.submit(self.reward_fn, images, prompts, metadata))
            batches.append({"prompts": prompts, "metadata": metadata, "embeds": embeds, "latents": latents,
                                "log_probs": log_probs, "timesteps": timesteps, "images": images})
        rollouts = {k: torch.cat([b[k] for b in batches]) for k in ("latents", "log_probs", "timesteps", "images")}
        rollouts["embeds"] = TextConditioning.cat(b["embeds"] for b in batches)
        rollouts["prompts"] = [p for b in batches for p in b["prompts"]]
        rollouts["metadata"] = [m for b in batches for m in b["metadata"]]
        rewards = [self._rewards(f, b["prompts"]) for f, b in zip(futures, batches)]
        rollouts["reward_maps"] = torch.cat([o.reward if o.reward.dim() == 3 else
                                             o.reward.view(-1, 1, 1).expand(-1, self.image_size, self.image_size)
                                             for o, _, _ in rewards])
        rollouts["reward_latent"] = torch.cat([r for _, r, _ in rewards])
        rollouts["weight_latent"] = torch.cat([w for _, _, w in rewards])
        return rollouts

    def compute_advantages(self, rollouts: dict) -> dict:
        """Advantages over all processes' samples (SPEC §4); adds ``advantages`` and ``weights``.

        pxpo: (B, h, w) maps with latent weights; ddpo: (B,) from each image's weighted mean reward.
        """
        acc = self.accelerator
        r, w = rollouts["reward_latent"], rollouts["weight_latent"]
        img_r, img_w = image_rewards(r, w)
        if self.config.algorithm == "ddpo":
            r, w = img_r, img_w
        all_r = acc.gather(r.to(acc.device)).cpu()
        all_w = acc.gather(w.to(acc.device)).cpu()
        all_img = acc.gather(torch.stack([img_r.flatten(), img_w.flatten()], dim=1).to(acc.device))
        all_prompts = _gather_strings(acc, rollouts["prompts"])
        adv = self.tracker.update(all_prompts, all_r, all_w)
        n = r.shape[0]
        adv = adv[acc.process_index * n:(acc.process_index + 1) * n]
        dev = acc.device
        if self.config.algorithm == "ddpo":
            rollouts["advantages"], rollouts["weights"] = adv.flatten().to(dev), None
        else:
            rollouts["advantages"], rollouts["weights"] = adv.to(dev), rollouts["weight_latent"].to(dev)
        rewarded = all_img[:, 1] > 0
        values = all_img[rewarded, 0].float().cpu()
        rollouts["stats"] = {
            "reward_mean": values.mean().item() if len(values) else float("nan"),
            "reward_std": values.std(unbiased=False).item() if len(values) else float("nan"),
            "images_without_feedback": int((~rewarded).sum()),
        }
        return rollouts

    # ------------------------------------------------------------------ training
    def backward_timestep(self, batch: dict, step_index: torch.Tensor) -> dict:
        """Loss of one minibatch at one (per-sample) step index; accumulates its gradient.

        ``batch`` holds per-sample ``embeds``, ``latents`` (B, T+1, ...), ``log_probs``,
        ``timesteps``, ``advantages`` and ``weights``. With ``compile_unet`` the first call first runs
        :meth:`check_compiled_gradient`.
        """
        if self._compiled_gradient_unchecked:
            self._compiled_gradient_unchecked = False
            self.check_compiled_gradient(batch, step_index)
        c = self.config
        rows = torch.arange(len(step_index), device=step_index.device)
        x_t = batch["latents"][rows, step_index]
        x_prev = batch["latents"][rows, step_index + 1]
        t = batch["timesteps"][rows, step_index]
        logp_old = batch["log_probs"][rows, step_index]
        with self.accelerator.autocast():
            noise = guided_noise(self.unet, x_t.to(self.weight_dtype), t, batch["embeds"], self.negative_embeds,
                                 self._guidance(training=True))
        mean, std = ddim_mean_and_std(self.scheduler, noise, t, x_t, c.sample_eta)
        loss, grad, stats = pxpo_loss_and_grad(
            x_prev, mean.detach(), std, logp_old, batch["advantages"], batch["weights"], clip_range=c.clip_range,
            granularity=c.logprob_granularity, loss_type=c.loss_type)
        # (mean * grad).sum() has gradient ``grad`` in ``mean``: the fused kernel's gradient enters autograd
        # through accelerate, which scales it for fp16 and divides it over the accumulation steps.
        objective = (mean * grad).sum()
        # 0-dim tensors, read once per epoch: a .item() per micro-step would make the host wait for the GPU.
        out = {"loss": loss.detach(), **stats}  # approx_kl, clipfrac, skipped
        if c.train_kl_coef > 0:
            kl = gaussian_kl(mean, self._reference_mean(x_t, t, batch["embeds"]), std, c.logprob_granularity).mean()
            objective = objective + c.train_kl_coef * kl
            out["reference_kl"] = kl.detach()
        self.accelerator.backward(objective)
        return out

    @torch.no_grad()
    def _reference_mean(self, x_t: torch.Tensor, t: torch.Tensor, embeds: TextConditioning) -> torch.Tensor:
        """The initial model's DDIM mean at these latents (the KL penalty's reference policy), guided as in training."""
        lora = self.reference_unet is None
        if lora and not self.config.use_lora:
            raise RuntimeError("train_kl_coef was turned on after this full fine-tuning trainer was built, so it kept "
                               "no copy of the initial UNet; set train_kl_coef in PXPOConfig before building the trainer")
        unet = self._unwrapped_unet if lora else self.reference_unet
        if lora:
            unet.disable_adapters()
        try:
            with self.accelerator.autocast():
                noise = guided_noise(unet, x_t.to(self.weight_dtype), t, embeds, self.negative_embeds,
                                     self._guidance(training=True))
        finally:
            if lora:
                unet.enable_adapters()
        return ddim_mean_and_std(self.scheduler, noise, t, x_t, self.config.sample_eta)[0]

    def check_compiled_gradient(self, batch: dict, step_index: torch.Tensor, tolerance: float = 0.05) -> float:
        """The compiled UNet's gradient against the eager one on this micro-step; raises if they disagree.

        Compilers have shipped silent miscompilations of backward passes (torch 2.13's CPU inductor gives
        some LoRA layers of a whole compiled UNet zero gradient), and a wrong gradient would train silently,
        so ``compile_unet`` is checked once before it is trusted. Returns the relative difference of the
        flattened trainable gradients; leaves the parameters' gradients as it found them.
        """
        self._compiled_gradient_unchecked = False
        # Cleared by hand: the accelerate optimizer's zero_grad does nothing between gradient-accumulation
        # boundaries, which is where training calls this (the compiled pass would add to the eager one's gradient).
        accumulated = [p.grad for p in self.params]
        grads = []
        try:
            for stance in ("force_eager", "default"):
                for p in self.params:
                    p.grad = None
                with torch.compiler.set_stance(stance):
                    self.backward_timestep(batch, step_index)
                grads.append(torch.cat([p.grad.float().flatten() for p in self.params if p.grad is not None]))
        finally:
            for p, grad in zip(self.params, accumulated):
                p.grad = grad
        eager, compiled = grads
        difference = ((compiled - eager).norm() / eager.norm().clamp_min(torch.finfo(torch.float32).tiny)).item()
        if not difference <= tolerance:  # also catches NaN
            raise RuntimeError(
                f"compile_unet={self.config.compile_unet!r}: the compiled UNet's gradient differs from the eager one by "
                f"{difference:.1%} (tolerance {tolerance:.0%}) on this machine (torch {torch.__version__}), a compiler "
                "bug that would train silently wrong; train with compile_unet='no'")
        logger.info("compile_unet: the compiled gradient matches the eager one (relative difference %.2e)", difference)
        return difference

    def _train_inner_epoch(self, rollouts: dict, progress=None) -> list[dict]:
        c, acc = self.config, self.accelerator
        dev = acc.device
        n = rollouts["latents"].shape[0]
        perm = torch.randperm(n, generator=self.generator).to(dev)
        keys = ("embeds", "latents", "log_probs", "timesteps", "advantages", "weights")
        shuffled = {k: (rollouts[k][perm] if rollouts[k] is not None else None) for k in keys}
        order = torch.stack([torch.randperm(len(self.train_step_indices), generator=self.generator)
                             for _ in range(n)])[:, :self.timesteps_per_sample]
        step_indices = self.train_step_indices[order].to(dev)  # (n, timesteps_per_sample)
        stats = []
        self.unet.train()
        for start in range(0, n, c.train_batch_size):
            mb = {k: (v[start:start + c.train_batch_size] if v is not None else None) for k, v in shuffled.items()}
            for j in range(self.timesteps_per_sample):
                with acc.accumulate(self.unet):
                    s = self.backward_timestep(mb, step_indices[start:start + c.train_batch_size, j])
                    if acc.sync_gradients:
                        if c.train_max_grad_norm > 0:
                            s["grad_norm"] = acc.clip_grad_norm_(self.params, c.train_max_grad_norm)
                        self.optimizer.step()
                        # fp16's GradScaler skips a step whose gradient overflowed (accelerate then holds the
                        # scheduler too); counted so that it is never silent. Free: the scaler has already synced.
                        s["optimizer_step_skipped"] = acc.optimizer_step_was_skipped
                        self.lr_scheduler.step()
                        self.optimizer.zero_grad()
                        self.global_step += 1
                stats.append(s)
                if progress is not None:
                    progress.update(1)
        return stats

    def step(self, epoch: int) -> dict:
        """One epoch: sample, reward, advantages, train. Returns the epoch's metrics."""
        c, acc = self.config, self.accelerator
        t0 = time.time()
        rollouts = self.compute_advantages(self.sample_epoch())
        # Every process sees the same gathered count, so all of them skip together (no collective is left waiting).
        no_feedback = rollouts["stats"]["images_without_feedback"] == self.samples_per_epoch * acc.num_processes
        if no_feedback:  # the gradient is zero, but an optimiser step would still apply decay and momentum
            logger.warning("epoch %d: no image got any feedback (all weights 0); its training is skipped", epoch)
            stats = []
        else:
            n_micro = (c.train_num_inner_epochs * (self.samples_per_epoch // c.train_batch_size)
                       * self.timesteps_per_sample)
            with tqdm(total=n_micro, desc=f"epoch {epoch} train", leave=False,
                      disable=not acc.is_local_main_process) as bar:
                stats = [s for _ in range(c.train_num_inner_epochs) for s in self._train_inner_epoch(rollouts, bar)]
        self.last_train_stats = stats
        loss = kl = clipfrac = float("nan")
        reference_kl = None
        skipped = 0
        if stats:
            keys = ("loss", "approx_kl", "clipfrac") + (("reference_kl",) if c.train_kl_coef > 0 else ())
            local = torch.stack([torch.stack([s[k] for k in keys]).float() for s in stats])
            loss, kl, clipfrac, *reference_kl = acc.reduce(local.mean(0).to(acc.device), reduction="mean").tolist()
            reference_kl = reference_kl[0] if reference_kl else None
            # Units the loss left out because their log-ratio overflowed (|log ratio| > LOG_RATIO_LIMIT or not
            # finite), summed over micro-steps and processes: never silent.
            skipped = int(acc.reduce(torch.stack([s["skipped"] for s in stats]).sum().float().to(acc.device),
                                     reduction="sum").item())
            if skipped:
                logger.warning("epoch %d: %d log-prob unit(s) skipped because their log-ratio overflowed", epoch,
                               skipped)
        norms = [s["grad_norm"] for s in stats if "grad_norm" in s]
        skipped_steps = sum(bool(s.get("optimizer_step_skipped")) for s in stats)  # the same on every process
        if skipped_steps:
            logger.warning("epoch %d: %d of %d optimiser step(s) skipped because the fp16 gradient overflowed "
                           "(GradScaler lowered its scale; usual in the first steps, a steady count means the loss or "
                           "the learning rate is too large for fp16)", epoch, skipped_steps,
                           sum("optimizer_step_skipped" in s for s in stats))
        self.samples_seen += self.samples_per_epoch * acc.num_processes
        self.epoch = epoch + 1
        metrics = {
            "epoch": epoch, "global_step": self.global_step, "samples_seen": self.samples_seen,
            **rollouts["stats"], "approx_kl": kl, "clipfrac": clipfrac, "loss": loss, "reference_kl": reference_kl,
            "grad_norm": torch.stack(norms).float().mean().item() if norms else None, "lr": self.lr_scheduler.get_last_lr()[0],
            "clip_range": c.clip_range, "trained_timesteps": self.timesteps_per_sample, "skipped_overflow_units": skipped,
            "skipped_optimizer_steps": skipped_steps, "skipped_deterministic_steps": self.skipped_steps,
            "skipped_without_feedback": no_feedback,
            **self.tracker.stats(),
            "seconds": time.time() - t0,
        }
        self.reporter.log_epoch(metrics)
        if c.log_images_every and (epoch + 1) % c.log_images_every == 0:
            k = min(len(rollouts["prompts"]), max(c.num_eval_images, 1))
            self.reporter.log_samples("train", rollouts["images"][:k].cpu(), rollouts["prompts"][:k],
                                      rollouts["reward_maps"][:k], step=epoch)
        return metrics

    def _log_eval(self, tag: str, step: int) -> None:
        if not self.eval_prompts:
            return
        images = self.generate(self.eval_prompts, self.eval_seeds)
        out = normalize_output(self.reward_fn(images, self.eval_prompts, [dict(m) for m in self.eval_metadata]),
                               self.reward_name, len(images), (self.image_size, self.image_size))
        self.reporter.log_samples(tag, images.cpu(), self.eval_prompts, out.reward, step=step, weight_maps=out.weight)

    def train(self, epochs: int | None = None) -> list[dict]:
        """Train up to ``config.num_epochs`` (or ``epochs`` more); returns the metrics of each epoch run."""
        c, acc = self.config, self.accelerator
        end = c.num_epochs if epochs is None else self.epoch + epochs
        if self.epoch == 0:
            self._log_eval("before", 0)
        history = []
        with tqdm(range(self.epoch, end), desc="epochs", disable=not acc.is_local_main_process,
                  initial=self.epoch, total=end) as bar:
            for epoch in bar:
                metrics = self.step(epoch)
                history.append(metrics)
                bar.set_postfix(reward=f"{metrics['reward_mean']:.4f}", kl=f"{metrics['approx_kl']:.2e}",
                                clip=f"{metrics['clipfrac']:.2f}")
                if c.save_freq and (epoch + 1) % c.save_freq == 0 and epoch + 1 < end:
                    self.save_checkpoint(Path(c.output_dir) / "checkpoints" / f"checkpoint-{epoch + 1}")
        if history:
            self.save_checkpoint(Path(c.output_dir) / "checkpoints" / f"checkpoint-{self.epoch}")
            self._log_eval("after", self.epoch)
            self.save_pretrained(self.weights_dir)
            self.reporter.plot_curves()
            if acc.is_main_process:
                print(self.reporter.summary())
        return history

    # ------------------------------------------------------------------ saving and resuming
    @property
    def weights_dir(self) -> Path:
        """Where :meth:`train` leaves the final weights: ``<output_dir>/lora`` for LoRA, ``<output_dir>`` (its
        ``unet/``) for full fine-tuning."""
        return Path(self.config.output_dir) / "lora" if self.config.use_lora else Path(self.config.output_dir)

    def save_pretrained(self, folder) -> None:
        """The trained weights: LoRA as ``pytorch_lora_weights.safetensors`` (``pipe.load_lora_weights(folder)``),
        or the full UNet under ``folder/unet``. Call it on every process."""
        acc, c = self.accelerator, self.config
        acc.wait_for_everyone()

        def write(tmp):
            if c.use_lora:
                save_lora(self._unwrapped_unet, tmp, c.lora_rank, c.lora_alpha)
            else:
                self._unwrapped_unet.save_pretrained(Path(tmp) / "unet")

        # Each file is written aside and renamed into place: a crash or a full disk never leaves half a file.
        # A failure on the main process makes every process raise; none waits for it forever.
        ckpt.on_main_process(acc, lambda: ckpt.replace_files(folder, write), f"save weights to {str(folder)!r}")

    def save_checkpoint(self, folder) -> Path:
        """Weights, optimiser, schedule, stat tracker, counters and RNG states; call it on every process."""
        acc, c = self.accelerator, self.config
        named = dict(self._unwrapped_unet.named_parameters())
        prompt_state = self.prompt_fn.state_dict() if hasattr(self.prompt_fn, "state_dict") else None
        path = ckpt.save_checkpoint(
            folder, acc,
            trainable={n: named[n] for n in self.trainable_names},
            optimizer=self.optimizer.state_dict(), lr_scheduler=self.lr_scheduler.state_dict(),
            stat_tracker=self.tracker.state_dict(),
            trainer_state={"epoch": self.epoch, "global_step": self.global_step, "samples_seen": self.samples_seen,
                           "num_processes": acc.num_processes, "config": c.to_dict()},
            rng_state=ckpt.capture_rng({"sampler": self.generator.get_state(), "prompts": prompt_state}),
            write_extra=(lambda tmp: save_lora(self._unwrapped_unet, tmp, c.lora_rank, c.lora_alpha))
            if c.use_lora else None)
        ckpt.on_main_process(acc, lambda: ckpt.prune(c.output_dir, c.num_checkpoint_limit),
                             f"prune old checkpoints of {str(c.output_dir)!r}")
        return path

    def _resume(self, where) -> None:
        acc, c = self.accelerator, self.config
        state = ckpt.load_checkpoint(where, acc.process_index)
        saved = state["trainer_state"]
        for key in ("algorithm", "granularity", "use_lora", "lora_rank"):
            if saved["config"].get(key) != getattr(c, key):
                raise ValueError(f"checkpoint {where} was trained with {key}={saved['config'].get(key)!r}, this run "
                                 f"has {key}={getattr(c, key)!r}; resume with the same setting")
        if saved["num_processes"] != acc.num_processes:
            raise ValueError(f"checkpoint {where} was written by {saved['num_processes']} process(es), this run has "
                             f"{acc.num_processes}; resume with the same number so every RNG stream continues")
        named = dict(self._unwrapped_unet.named_parameters())
        missing = set(self.trainable_names) - set(state["trainable"])
        extra = set(state["trainable"]) - set(self.trainable_names)
        wrong = sorted(n for n in set(self.trainable_names) & set(state["trainable"])
                       if state["trainable"][n].shape != named[n].shape)
        if missing or extra or wrong:
            example = (f"{len(missing)} missing, e.g. {min(missing)}" if missing else
                       f"{len(extra)} unknown to this model, e.g. {min(extra)}" if extra else
                       f"{wrong[0]} is {tuple(state['trainable'][wrong[0]].shape)} in the checkpoint but "
                       f"{tuple(named[wrong[0]].shape)} here")
            raise ValueError(f"checkpoint {where} does not fit this model's trained parameters ({example}); it was "
                             f"trained on model={saved['config'].get('model')!r}, this run has model={c.model!r}")
        with torch.no_grad():
            for name in self.trainable_names:
                named[name].copy_(state["trainable"][name])
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        self.tracker.load_state_dict(state["stat_tracker"])
        self.epoch, self.global_step = saved["epoch"], saved["global_step"]
        self.samples_seen = saved["samples_seen"]
        rng = state["rng_state"]
        ckpt.restore_rng(rng)
        self.generator.set_state(rng["sampler"])
        if rng.get("prompts") is not None and hasattr(self.prompt_fn, "load_state_dict"):
            self.prompt_fn.load_state_dict(rng["prompts"])
        logger.info("resumed from %s at epoch %d, global step %d", where, self.epoch, self.global_step)

    def close(self) -> None:
        self.executor.shutdown(wait=True)
        self.reporter.close()


def _gather_strings(accelerator, items: list[str]) -> list[str]:
    """Every process's list, concatenated in process order."""
    return list(items) if accelerator.num_processes == 1 else list(gather_object(list(items)))


__all__ = ["PXPOConfig", "PXPOTrainer", "load_pipeline"]
