"""``PXPOConfig``: every setting of a PXPO/DDPO run, as a flat TRL-style dataclass.

Each field carries ``metadata={"help": ...}``; the command line builds ``--help`` from it.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields

from ..ops import DDPO_CLIP_RANGE, DEFAULT_CLIP_RANGE

ALGORITHMS = ("pxpo", "ddpo")
LOSS_TYPES = ("ppo", "sf")
GRANULARITIES = ("pixel", "element")
BASELINES = ("group", "location")
MIXED_PRECISION = ("no", "fp16", "bf16")
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine")
COMPILE_MODES = ("no", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
COMPILE_SCOPES = ("unet", "blocks")


def _help(text: str, choices: tuple = (), **kwargs):
    metadata = {"help": text, "choices": choices} if choices else {"help": text}
    return field(metadata=metadata, **kwargs)


@dataclass
class PXPOConfig:
    # What is trained, on what, towards what.
    algorithm: str = _help("'pxpo' (per-pixel rewards and ratios) or 'ddpo' (one scalar per image)", default="pxpo",
                           choices=ALGORITHMS)
    loss_type: str = _help("'ppo' (clipped ratio, several steps per rollout) or 'sf' (score function, one step)",
                           default="ppo", choices=LOSS_TYPES)
    granularity: str = _help("pxpo log-prob unit: 'pixel' (sum over latent channels) or 'element' (one per channel)",
                             default="pixel", choices=GRANULARITIES)
    model: str | None = _help("diffusers folder or hub id of a Stable Diffusion (1.x, 2.x) or SDXL pipeline; "
                              "None = the embedded model", default=None)
    resolution: int | None = _help("image side in pixels; None = the model's native size", default=None)
    reward: str = _help("a registered reward (pxpo_ext.rewards.available_rewards()), or your own as "
                        "package.module:name or path/to/file.py:name (a reward function, or a factory "
                        "called with reward_kwargs)", default="colour")
    reward_kwargs: dict = field(default_factory=dict, metadata={
        "help": "options passed to the reward factory, e.g. {'channel': 'blue'}"})
    prompts: str = _help("prompt source: 'scenes', 'animals', 'text:<one prompt>', 'file:<path, one per line>', "
                         "'cycle:<n>:<source>' (n prompts drawn once, then repeated, each from fixed noise), or your "
                         "own as path/to/file.py:name or package.module:name (a list of prompts, a prompt_fn, or a "
                         "factory called with seed=)", default="scenes")
    output_dir: str = _help("run folder: metrics, images, checkpoints and the final weights", default="runs/pxpo")
    seed: int = _help("random seed (each process adds its index)", default=0)
    num_epochs: int = _help("epochs to train; each samples, rewards and trains once", default=20)

    # Sampling.
    sample_num_steps: int = _help("DDIM steps per image", default=10)
    sample_eta: float = _help("DDIM eta (> 0: the policy needs a density)", default=1.0)
    sample_guidance_scale: float = _help("classifier-free guidance scale", default=5.0)
    sample_negative_prompt: str = _help("the prompt guidance steers away from, in sampling and training alike "
                                        "(the policy is the guided model); '' as in DDPO and TRL", default="")
    sample_batch_size: int = _help("images per sampling batch, per process", default=8)
    sample_num_batches_per_epoch: int = _help("sampling batches per epoch, per process", default=2)

    # Training.
    train_batch_size: int = _help("rollouts per training minibatch, per process", default=8)
    train_learning_rate: float = _help("AdamW learning rate", default=3e-4)
    train_adam_beta1: float = _help("AdamW beta1", default=0.9)
    train_adam_beta2: float = _help("AdamW beta2", default=0.999)
    train_adam_weight_decay: float = _help("AdamW weight decay", default=1e-4)
    train_adam_epsilon: float = _help("AdamW epsilon", default=1e-8)
    train_lr_scheduler: str = _help(f"learning-rate schedule: {', '.join(LR_SCHEDULERS)}", default="constant",
                                    choices=LR_SCHEDULERS)
    train_lr_warmup_steps: int = _help("warm-up optimiser steps of the schedule", default=0)
    train_gradient_accumulation_steps: int = _help("minibatches per optimiser step (timesteps always accumulate)",
                                                   default=1)
    train_max_grad_norm: float = _help("gradient-norm clip (0: no clipping)", default=1.0)
    train_num_inner_epochs: int = _help("passes over each epoch's rollouts (ppo only; sf needs 1)", default=1)
    train_cfg: bool = _help("recompute the policy with classifier-free guidance, as sampled", default=True)
    train_adv_clip_max: float = _help("advantages are clipped to [-max, max]", default=5.0)
    train_clip_range: float | None = _help(
        f"PPO ratio clip eps; None = {DEFAULT_CLIP_RANGE} for pxpo's per-pixel ratios, {DDPO_CLIP_RANGE} for ddpo",
        default=None)
    train_timestep_fraction: float = _help("fraction of each trajectory's stochastic steps trained on", default=1.0)
    train_kl_coef: float = _help(
        "weight of a KL penalty toward the initial model, on every latent pixel whatever its feedback weight "
        "(0: off). Costs one more UNet forward per micro-step; full fine-tuning also keeps a frozen copy of the UNet",
        default=0.0)

    # Advantages (SPEC §4).
    per_prompt_stat_tracking: bool = _help("normalise rewards per prompt (buffered) instead of per batch",
                                           default=True)
    stat_buffer_size: int = _help("past rewards kept per prompt", default=16)
    stat_min_count: int = _help("below this many buffered rewards a prompt uses batch statistics", default=16)
    advantage_baseline: str = _help("'group': one mean over the group's weighted pixels; "
                                    "'location': one mean per latent pixel", default="group", choices=BASELINES)
    advantage_std_floor: float = _help("advantages divide by max(sd, this), in reward units: a group whose rewards "
                                       "barely differ weighs less than the others, not its noise at full size (0: off)",
                                       default=0.0)

    # Model and devices.
    use_lora: bool = _help("train LoRA adapters on the UNet attention (False: full fine-tuning)", default=True)
    lora_rank: int = _help("LoRA rank", default=4)
    lora_alpha: float | None = _help("LoRA alpha; None = the rank (scale 1)", default=None)
    mixed_precision: str = _help("'no', 'fp16' or 'bf16' for the frozen model; log-probs stay float32", default="no",
                                 choices=MIXED_PRECISION)
    allow_tf32: bool = _help("allow TF32 matmuls on Ampere or newer GPUs", default=True)
    compile_unet: str = _help("torch.compile the UNet with this mode ('no': eager). The first epoch pays the "
                              "compilation (a minute or more at SD-1.5 scale); see BENCHMARKS.md for what it gains",
                              default="no", choices=COMPILE_MODES)
    compile_scope: str = _help("what compile_unet compiles: 'unet', the whole model; 'blocks', only its repeated "
                               "transformer blocks (diffusers' regional compilation: a far shorter first "
                               "compilation, the rest of the UNet eager)", default="unet", choices=COMPILE_SCOPES)

    # Output.
    save_freq: int = _help("write a checkpoint every this many epochs (0: only at the end)", default=5)
    num_checkpoint_limit: int = _help("checkpoints kept (oldest removed first); 0 keeps all", default=3)
    resume_from: str | None = _help("checkpoint folder, or a run folder to take its latest checkpoint",
                                    default=None)
    log_images_every: int = _help("log sample grids every this many epochs (0: only before and after)", default=5)
    num_eval_images: int = _help("fixed-seed images rendered before and after training", default=4)
    use_tensorboard: bool = _help("write tensorboard events in the run folder", default=True)
    reward_workers: int = _help("threads computing rewards while the next batch samples", default=2)

    def __post_init__(self):
        def choice(name, options):
            value = getattr(self, name)
            if value not in options:
                raise ValueError(f"{name} must be one of {', '.join(options)}, got {value!r}")

        choice("algorithm", ALGORITHMS)
        choice("loss_type", LOSS_TYPES)
        choice("granularity", GRANULARITIES)
        choice("advantage_baseline", BASELINES)
        choice("mixed_precision", MIXED_PRECISION)
        choice("train_lr_scheduler", LR_SCHEDULERS)
        choice("compile_unet", COMPILE_MODES)
        choice("compile_scope", COMPILE_SCOPES)
        for name in ("num_epochs", "sample_num_steps", "sample_batch_size", "sample_num_batches_per_epoch",
                     "train_batch_size", "train_gradient_accumulation_steps", "train_num_inner_epochs",
                     "stat_buffer_size", "lora_rank", "reward_workers"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        def number(name, ok, rule):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or not ok(value):
                raise ValueError(f"{name} must be {rule}, got {value!r}")

        number("train_learning_rate", lambda v: v > 0, "a finite number > 0")
        number("train_adam_beta1", lambda v: 0 <= v < 1, "in [0, 1)")
        number("train_adam_beta2", lambda v: 0 <= v < 1, "in [0, 1)")
        number("train_adam_epsilon", lambda v: v > 0, "a finite number > 0")
        number("train_adam_weight_decay", lambda v: v >= 0, "a finite number >= 0")
        number("train_max_grad_norm", lambda v: v >= 0, "a finite number >= 0 (0: no clipping)")
        number("train_adv_clip_max", lambda v: v > 0, "a finite number > 0")
        number("advantage_std_floor", lambda v: v >= 0, "a finite number >= 0 (0: no floor)")
        number("train_kl_coef", lambda v: v >= 0, "a finite number >= 0 (0: no KL penalty)")
        number("train_lr_warmup_steps", lambda v: v >= 0 and v == int(v), "an integer >= 0")
        if self.lora_alpha is not None:
            number("lora_alpha", lambda v: v > 0, "a finite number > 0 or None (the rank)")
        if not self.sample_eta > 0:
            raise ValueError(f"sample_eta must be > 0 (eta = 0 is deterministic: no log-probability), "
                             f"got {self.sample_eta}")
        if not 0 < self.train_timestep_fraction <= 1:
            raise ValueError(f"train_timestep_fraction must be in (0, 1], got {self.train_timestep_fraction}")
        if self.train_clip_range is not None and not self.train_clip_range > 0:
            raise ValueError(f"train_clip_range must be > 0 or None (the algorithm's default), "
                             f"got {self.train_clip_range}")
        if self.loss_type == "sf" and self.train_num_inner_epochs != 1:
            raise ValueError("loss_type='sf' has no ratio to correct for off-policy data: "
                             f"set train_num_inner_epochs=1 (got {self.train_num_inner_epochs})")
        samples = self.sample_batch_size * self.sample_num_batches_per_epoch
        if samples % self.train_batch_size:
            raise ValueError(f"the {samples} samples per epoch and process (sample_batch_size x "
                             f"sample_num_batches_per_epoch) must split into train_batch_size={self.train_batch_size}")
        if (samples // self.train_batch_size) % self.train_gradient_accumulation_steps:
            raise ValueError(f"the {samples // self.train_batch_size} minibatches per epoch must be a multiple of "
                             f"train_gradient_accumulation_steps={self.train_gradient_accumulation_steps}, "
                             "so that every optimiser step sees whole accumulation cycles")
        if self.stat_min_count < 0 or self.save_freq < 0 or self.log_images_every < 0 or self.num_eval_images < 0:
            raise ValueError("stat_min_count, save_freq, log_images_every and num_eval_images must be >= 0")
        if self.resolution is not None and self.resolution < 8:
            raise ValueError(f"resolution must be at least 8 pixels, got {self.resolution}")
        if not isinstance(self.reward_kwargs, dict):
            raise TypeError(f"reward_kwargs must be a dict, got {type(self.reward_kwargs).__name__}")

    @property
    def clip_range(self) -> float:
        """The PPO clip eps in use: the configured one, else the algorithm's default."""
        if self.train_clip_range is not None:
            return float(self.train_clip_range)
        return DDPO_CLIP_RANGE if self.algorithm == "ddpo" else DEFAULT_CLIP_RANGE

    @property
    def logprob_granularity(self) -> str:
        """Granularity of stored and recomputed log-probs: ddpo's per-image mean or pxpo's unit."""
        return "mean" if self.algorithm == "ddpo" else self.granularity

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]
