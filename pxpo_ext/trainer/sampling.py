"""Rollouts: DDIM sampling with classifier-free guidance that records what training needs.

Each step calls :func:`pxpo_ext.ddim_step_with_logprob`, storing the latents, the float32
log-probability at the trainer's granularity and the timestep. Deterministic steps
(sigma = 0, e.g. a final step with ``set_alpha_to_one=True``) have no density: they are taken
at their mean and marked untrainable.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.utils.torch_utils import randn_tensor

from ..ddim import ddim_mean_and_std, ddim_sigmas, ddim_step_with_logprob


@dataclass(frozen=True)
class TextConditioning:
    """What the UNet is conditioned on, one row per prompt.

    ``hidden_states`` (B, L, D) are the text encoder's; SDXL-style UNets (``addition_embed_type="text_time"``)
    also take the pooled text embedding ``pooled`` (B, P) and the size and crop ids ``time_ids`` (B, 6) as
    ``added_cond_kwargs``. Indexing and slicing select rows of all three, as for a tensor.
    """

    hidden_states: torch.Tensor
    pooled: torch.Tensor | None = None
    time_ids: torch.Tensor | None = None

    def _parts(self) -> tuple:
        return self.hidden_states, self.pooled, self.time_ids

    def _map(self, fn) -> TextConditioning:
        return TextConditioning(*(None if t is None else fn(t) for t in self._parts()))

    def __getitem__(self, index) -> TextConditioning:
        return self._map(lambda t: t[index])

    def __len__(self) -> int:
        return self.hidden_states.shape[0]

    def expand(self, n: int) -> TextConditioning:
        """``n`` rows of a one-row conditioning (the negative prompt's), without copying."""
        return self._map(lambda t: t.expand(n, *t.shape[1:]))

    @staticmethod
    def cat(items) -> TextConditioning:
        parts = zip(*(c._parts() for c in items), strict=True)
        return TextConditioning(*(None if part[0] is None else torch.cat(part) for part in parts))

    def unet_kwargs(self) -> dict:
        if self.pooled is None:
            return {"encoder_hidden_states": self.hidden_states}
        return {"encoder_hidden_states": self.hidden_states,
                "added_cond_kwargs": {"text_embeds": self.pooled, "time_ids": self.time_ids}}


def needs_added_conditioning(unet) -> bool:
    """Whether the UNet is SDXL-style: it takes a pooled text embedding and size ids besides the hidden states."""
    return getattr(unet.config, "addition_embed_type", None) == "text_time"


def encode_prompts(pipe, prompts: list[str], device, image_size: int | None = None) -> TextConditioning:
    """The conditioning of ``prompts`` from the pipeline's own ``encode_prompt`` (any SD-style tokenizer).

    For an SDXL pipeline also the pooled embedding and the time ids of an uncropped ``image_size``
    square image, as ``StableDiffusionXLPipeline`` builds them by default."""
    if not needs_added_conditioning(pipe.unet):
        embeds, _ = pipe.encode_prompt(list(prompts), device, 1, False)
        return TextConditioning(embeds)
    if image_size is None:
        raise ValueError("an SDXL-style pipeline's conditioning needs the image size (its time ids hold it)")
    embeds, _, pooled, _ = pipe.encode_prompt(list(prompts), device=device, num_images_per_prompt=1,
                                              do_classifier_free_guidance=False)
    size = (image_size, image_size)
    projection = pipe.text_encoder_2.config.projection_dim if pipe.text_encoder_2 is not None else pooled.shape[-1]
    time_ids = pipe._get_add_time_ids(size, (0, 0), size, dtype=embeds.dtype, text_encoder_projection_dim=projection)
    return TextConditioning(embeds, pooled, time_ids.to(device).expand(len(prompts), -1))


def negative_conditioning(pipe, device, image_size: int | None = None, prompt: str = "") -> TextConditioning:
    """The negative branch of classifier-free guidance, one row: ``prompt``'s conditioning; for the empty
    prompt, zeros where an SDXL pipeline says so (``force_zeros_for_empty_prompt``, as its own sampler does)."""
    cond = encode_prompts(pipe, [prompt], device, image_size)
    if not prompt and cond.pooled is not None and getattr(pipe.config, "force_zeros_for_empty_prompt", False):
        return TextConditioning(torch.zeros_like(cond.hidden_states), torch.zeros_like(cond.pooled), cond.time_ids)
    return cond


def initial_latents(shape, seeds: list[int | None], generator: torch.Generator, device) -> torch.Tensor:
    """x_T per sample: from ``Generator().manual_seed(seed)`` where a seed is given, else from ``generator``."""
    rows = []
    for seed in seeds:
        gen = torch.Generator().manual_seed(int(seed)) if seed is not None else generator
        rows.append(randn_tensor((1, *shape), generator=gen, device=torch.device(device), dtype=torch.float32))
    return torch.cat(rows)


def trainable_steps(scheduler, eta: float) -> torch.Tensor:
    """Bool (T,): which of ``scheduler.timesteps`` are stochastic (sigma > 0) and so can be trained on."""
    return ddim_sigmas(scheduler, eta) > 0


def guided_noise(unet, latents, timesteps, cond: TextConditioning, negative: TextConditioning,
                 guidance_scale: float | None):
    """The UNet's prediction, with classifier-free guidance as one batched forward when a scale is given."""
    if guidance_scale is None:
        return unet(latents, timesteps, **cond.unet_kwargs()).sample
    n = latents.shape[0]
    model_in = torch.cat([latents, latents])
    t_in = torch.cat([timesteps, timesteps]) if timesteps.dim() else timesteps
    both = TextConditioning.cat([negative.expand(n), cond])
    out = unet(model_in, t_in, **both.unet_kwargs()).sample
    uncond, cond_out = out.float().chunk(2)
    return uncond + guidance_scale * (cond_out - uncond)


def decode(vae, latents: torch.Tensor) -> torch.Tensor:
    """Images (B, 3, H, W) float32 in [0, 1] from x_0 latents."""
    x = latents.to(vae.dtype) / vae.config.scaling_factor
    return (vae.decode(x, return_dict=False)[0].float() / 2 + 0.5).clamp(0, 1)


def step_noise(shape, num_steps: int, generator, device) -> torch.Tensor:
    """The noise of ``num_steps`` sampling steps, ``(num_steps, *shape)``, on ``device``.

    Drawn up front from ``generator`` (one, or one per sample), exactly as step-by-step
    ``randn_tensor`` draws would be, then copied once: a host-to-device copy per step would
    make every step wait for the GPU.
    """
    if isinstance(generator, list) and len(generator) != shape[0]:
        raise ValueError(f"got {len(generator)} generators for a batch of {shape[0]}")
    source = torch.device(device) if generator is None else (
        generator[0] if isinstance(generator, list) else generator).device
    noise = torch.stack([randn_tensor(shape, generator=generator, device=source) for _ in range(num_steps)]) \
        if num_steps else torch.empty((0, *shape))
    if noise.device.type == "cpu" and torch.device(device).type == "cuda":
        noise = noise.pin_memory()
    return noise.to(device, non_blocking=True)


@torch.no_grad()
def sample(unet, vae, scheduler, cond, negative, latents, *, num_steps: int, eta: float,
           guidance_scale: float, granularity: str, generator, dtype=torch.float32):
    """Run the sampler from ``latents`` (x_T, float32); the UNet sees them in ``dtype``.

    ``generator``: one ``torch.Generator`` or one per sample (diffusers' ``randn_tensor`` convention).
    Returns ``(all_latents (B, T+1, ...), log_probs (B, T, ...), timesteps (B, T), images)``.
    """
    scheduler.set_timesteps(num_steps, device=latents.device)
    stochastic = trainable_steps(scheduler, eta)
    scale = guidance_scale if guidance_scale != 1.0 else None
    noises = iter(step_noise(latents.shape, int(stochastic.sum()), generator, latents.device))
    all_latents, all_logps = [latents], []
    x = latents
    for i, t in enumerate(scheduler.timesteps):
        noise = guided_noise(unet, x.to(dtype), t, cond, negative, scale)
        if stochastic[i]:
            # t stays on the device and stochastic[i] is known on the host: the step needs no sync.
            step = ddim_step_with_logprob(scheduler, noise, t, x, eta=eta, granularity=granularity,
                                          variance_noise=next(noises))
            x = step.prev_sample
            all_logps.append(step.log_prob)
        else:  # no density: take the mean, store no log-prob (filled with zeros below, never trained on)
            x, _ = ddim_mean_and_std(scheduler, noise, t, x, eta)
            all_logps.append(None)
        all_latents.append(x)
    template = next((lp for lp in all_logps if lp is not None), None)
    if template is None:
        raise ValueError("every sampling step is deterministic (sigma = 0): nothing to train on; use eta > 0")
    log_probs = torch.stack([torch.zeros_like(template) if lp is None else lp for lp in all_logps], dim=1)
    timesteps = scheduler.timesteps.to(latents.device).long().unsqueeze(0).expand(latents.shape[0], -1)
    return torch.stack(all_latents, dim=1), log_probs, timesteps.contiguous(), decode(vae, x)
