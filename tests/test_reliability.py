"""Reliability (issue #9): a run killed with SIGKILL resumes bit-exactly, failed writes damage nothing,
bad input fails with a message that names the problem, nothing is unpickled from disk.

The crash tests run training in a child process (this file, run as a script: see :func:`_driver`)
and kill it from inside with ``os.kill(os.getpid(), SIGKILL)``: once in the middle of an epoch,
once half-way through writing a checkpoint file. The kill is injected by the driver, which wraps
a trainer method or ``torch.save``; the library has no test hooks. The run is then resumed from
its run folder (``resume_from`` picks the latest complete checkpoint) in a fresh process, trained
to the same final epoch, and its trained weights must equal an uninterrupted run's bit for bit.

``docs/reliability.md`` lists every bad-input case with the test that covers it.
"""
import errno
import hashlib
import io
import json
import math
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
EPOCHS = 3  # checkpoints after epochs 1, 2 and 3
PROMPTS = ["a red circle", "a blue star"]


def _settings(model: str, out, **overrides) -> dict:
    """A run of a few seconds per epoch in which every piece of resumable state matters: two prompts with
    per-prompt buffers that fill, a cosine schedule with warm-up, two shuffled minibatches, two inner epochs."""
    settings = {"model": model, "output_dir": str(out), "seed": 3, "num_epochs": EPOCHS, "sample_num_steps": 3,
                "sample_batch_size": 2, "sample_num_batches_per_epoch": 1, "train_batch_size": 1,
                "train_num_inner_epochs": 2, "per_prompt_stat_tracking": True, "stat_buffer_size": 4,
                "stat_min_count": 2, "train_lr_scheduler": "cosine", "train_lr_warmup_steps": 1,
                "train_learning_rate": 1e-2, "num_eval_images": 0, "save_freq": 1, "num_checkpoint_limit": 0,
                "log_images_every": 0, "use_tensorboard": False, "reward_workers": 1}
    settings.update(overrides)
    return settings


def _blue_reward(images, prompts, metadata):
    return -images[:, 2]


# ------------------------------------------------------------------ the child process
def _driver(model: str, out: str, mode: str) -> None:
    """Train ``EPOCHS`` epochs into ``out``; ``mode`` says where to die, or to resume from ``out``.

    - ``full``: train uninterrupted;
    - ``kill_in_epoch``: SIGKILL in the middle of epoch 1's training (after one optimiser step);
    - ``kill_in_save``: SIGKILL half-way through writing ``optimizer.pt`` of checkpoint-2;
    - ``resume``: resume from ``out``'s latest complete checkpoint and train to epoch ``EPOCHS``.

    Ends by writing the trained parameters to ``out/final.safetensors``.
    """
    torch.set_num_threads(1)
    from pxpo_ext.trainer import PXPOConfig, PXPOTrainer, load_pipeline
    from pxpo_ext.trainer import checkpoint as ckpt
    from pxpo_ext.trainer.prompts import PromptSource

    def die():
        sys.stdout.flush()
        os.kill(os.getpid(), signal.SIGKILL)

    if mode == "kill_in_epoch":
        real_backward = PXPOTrainer.backward_timestep

        def backward_then_die(self, batch, step_index):
            out = real_backward(self, batch, step_index)
            if self.epoch == 1 and self.global_step >= 1 + self.optimizer_steps_per_epoch:  # epoch 1 has stepped
                die()
            return out

        PXPOTrainer.backward_timestep = backward_then_die
    elif mode == "kill_in_save":
        real_save = torch.save

        def save_half_then_die(obj, f, *args, **kwargs):
            path = Path(f) if isinstance(f, (str, os.PathLike)) else None
            if path is not None and path.name == "optimizer.pt" and path.parent.name == ".checkpoint-2.tmp":
                buffer = io.BytesIO()
                real_save(obj, buffer, *args, **kwargs)
                data = buffer.getvalue()
                with open(path, "wb") as handle:
                    handle.write(data[:len(data) // 2])
                    handle.flush()
                    os.fsync(handle.fileno())
                die()
            return real_save(obj, f, *args, **kwargs)

        ckpt.torch.save = save_half_then_die  # the very function checkpoint.py calls
    resume = {"resume_from": out} if mode == "resume" else {}
    config = PXPOConfig(**_settings(model, out, **resume))
    trainer = PXPOTrainer(config, _blue_reward, PromptSource(PROMPTS, seed=5), load_pipeline(model))
    trainer.train()
    trainer.close()
    named = dict(trainer._unwrapped_unet.named_parameters())
    save_file({n: named[n].detach().clone().contiguous() for n in trainer.trainable_names},
              Path(out) / "final.safetensors")
    Path(out, "final.json").write_text(json.dumps({"epoch": trainer.epoch, "global_step": trainer.global_step,
                                                   "samples_seen": trainer.samples_seen}))


def _run_driver(model, out, mode, expect_killed=False) -> str:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(ROOT), str(HERE)]))
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), model, str(out), mode], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300, check=False)
    if expect_killed:
        assert proc.returncode == -signal.SIGKILL, f"{mode}: expected SIGKILL, got {proc.returncode}:\n" \
                                                   f"{proc.stdout[-3000:]}"
    elif proc.returncode:
        pytest.fail(f"{mode} failed ({proc.returncode}):\n{proc.stdout[-4000:]}")
    return proc.stdout


def _digest(folder: Path) -> dict:
    """Every file's hash: safetensors by their tensors (their metadata's key order varies between processes),
    ``trainer_state.json`` without the run's folder and resume_from."""
    digest = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}
    for name in digest:
        if name.endswith(".safetensors"):
            tensors = load_file(folder / name)
            digest[name] = {k: hashlib.sha256(v.numpy().tobytes()).hexdigest() for k, v in tensors.items()}
    state = json.loads((folder / "trainer_state.json").read_text())
    state["config"].pop("output_dir"), state["config"].pop("resume_from")
    digest["trainer_state.json"] = state
    return digest


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def reference(tiny_model, tmp_path_factory):
    """An uninterrupted run (in a child process, as the interrupted ones)."""
    out = tmp_path_factory.mktemp("reliability") / "full"
    _run_driver(tiny_model, out, "full")
    return out


def _assert_same_as_reference(run: Path, reference: Path) -> None:
    final, expected = load_file(run / "final.safetensors"), load_file(reference / "final.safetensors")
    assert set(final) == set(expected) and len(final) > 0
    different = [n for n in expected if not torch.equal(final[n], expected[n])]
    assert not different, f"{len(different)} trained tensors differ after the resume, e.g. {different[0]}"
    assert json.loads((run / "final.json").read_text()) == json.loads((reference / "final.json").read_text())
    keys = ("epoch", "global_step", "samples_seen", "reward_mean", "loss", "approx_kl", "lr")
    assert [{k: m[k] for k in keys} for m in _metrics(run)] == [{k: m[k] for k in keys} for m in _metrics(reference)]
    # the final LoRA file that diffusers loads is byte-identical too
    lora = "lora/pytorch_lora_weights.safetensors"
    assert load_file(run / lora).keys() == load_file(reference / lora).keys()
    assert all(torch.equal(load_file(run / lora)[k], load_file(reference / lora)[k]) for k in load_file(run / lora))


def test_sigkill_in_the_middle_of_an_epoch_then_resume_is_bit_exact(tiny_model, reference, tmp_path):
    from pxpo_ext.trainer import checkpoint as ckpt

    run = tmp_path / "run"
    _run_driver(tiny_model, run, "kill_in_epoch", expect_killed=True)
    assert [p.name for p in ckpt.list_checkpoints(run)] == ["checkpoint-1"]
    assert not (run / "final.safetensors").exists()
    # the checkpoint the killed run left is the uninterrupted run's, byte for byte
    assert _digest(run / "checkpoints" / "checkpoint-1") == _digest(reference / "checkpoints" / "checkpoint-1")
    _run_driver(tiny_model, run, "resume")
    _assert_same_as_reference(run, reference)


def test_sigkill_while_writing_a_checkpoint_keeps_the_previous_one_and_resumes_bit_exactly(tiny_model, reference,
                                                                                        tmp_path):
    from pxpo_ext.trainer import checkpoint as ckpt

    run = tmp_path / "run"
    _run_driver(tiny_model, run, "kill_in_save", expect_killed=True)
    half = run / "checkpoints" / ".checkpoint-2.tmp"
    assert (half / "optimizer.pt").is_file() and not (half / "trainer_state.json").exists()  # died mid-write
    assert not (run / "checkpoints" / "checkpoint-2").exists()
    # the half-written folder is never "latest"; the previous checkpoint is intact and loads
    assert [p.name for p in ckpt.list_checkpoints(run)] == ["checkpoint-1"]
    assert ckpt.resolve(run) == run / "checkpoints" / "checkpoint-1"
    assert _digest(run / "checkpoints" / "checkpoint-1") == _digest(reference / "checkpoints" / "checkpoint-1")
    ckpt.load_checkpoint(run)
    _run_driver(tiny_model, run, "resume")
    _assert_same_as_reference(run, reference)
    assert not half.exists(), "the next save should clear the interrupted save's temporary folder"
    assert _digest(run / "checkpoints" / "checkpoint-3") == _digest(reference / "checkpoints" / "checkpoint-3")



# ------------------------------------------------------------------ bad input: one small trained run, reused
@pytest.fixture(scope="module")
def trained(tiny_model, tmp_path_factory):
    """A trainer after one epoch: ``run/checkpoints/checkpoint-1`` and ``run/lora`` exist."""
    from test_trainer import make_trainer

    torch.set_num_threads(1)
    run = tmp_path_factory.mktemp("bad_input") / "run"
    trainer = make_trainer(tiny_model, run, prompt_fn=lambda: ("a red circle", {}))
    trainer.train()
    yield trainer
    trainer.close()


def _checkpoint(trained) -> Path:
    return Path(trained.config.output_dir) / "checkpoints" / "checkpoint-1"


def _copy_checkpoint(trained, tmp_path) -> Path:
    import shutil

    copy = tmp_path / "copy" / "checkpoints" / "checkpoint-1"
    shutil.copytree(_checkpoint(trained), copy)
    return copy


def _weights(trainer) -> dict:
    named = dict(trainer._unwrapped_unet.named_parameters())
    return {n: named[n].detach().clone() for n in trainer.trainable_names}


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _map_reward(reward=None, weight=None):
    from pxpo_ext.rewards import RewardOutput

    def bad_reward(images, prompts, metadata):
        r = -images[:, 2] if reward is None else torch.full_like(images[:, 2], reward)
        return RewardOutput(reward=r, weight=None if weight is None else torch.full_like(images[:, 2], weight))

    return bad_reward


@pytest.mark.parametrize("reward, weight, message", [
    (float("nan"), None, "returned rewards with NaN or infinity"),
    (float("inf"), None, "returned rewards with NaN or infinity"),
    (None, float("nan"), "returned a weight map with NaN or infinity"),
    (None, float("inf"), "returned a weight map with NaN or infinity"),
    (None, 1.5, r"returned a weight map with weights outside \[0, 1\] \(min 1.5"),
    (None, -0.5, r"returned a weight map with weights outside \[0, 1\] \(min -0.5"),
], ids=["nan-reward", "inf-reward", "nan-weight", "inf-weight", "weight-above-1", "negative-weight"])
def test_non_finite_rewards_or_weights_stop_the_epoch_before_anything_changes(trained, reward, weight, message):
    from pxpo_ext.rewards.base import RewardError

    run = Path(trained.config.output_dir)
    before, files, step = _weights(trained), _files(run), trained.global_step
    trained.reward_fn, trained.reward_name = _map_reward(reward, weight), "bad_reward"
    with pytest.raises(RewardError, match=f"reward function 'bad_reward' {message}"):
        trained.step(trained.epoch)
    after = _weights(trained)
    assert all(torch.equal(before[n], after[n]) for n in before) and trained.global_step == step
    assert _files(run) == files  # no metrics line, no checkpoint, no image written


def test_a_batch_without_any_feedback_trains_nothing_and_says_so(tiny_model, tmp_path):
    """Zero weights on every image: nothing to learn from. The epoch reports it (every image counted in
    ``images_without_feedback``, ``reward_mean`` NaN) and trains nothing (loss NaN: no step was taken). One
    image without feedback among others is valid (SPEC §5): the others still train."""
    from test_trainer import make_trainer

    trainer = make_trainer(tiny_model, tmp_path / "run", reward=_map_reward(weight=0.0))
    metrics = trainer.step(0)
    trainer.close()
    assert metrics["images_without_feedback"] == 2 and math.isnan(metrics["reward_mean"])
    assert math.isnan(metrics["loss"]) and metrics["grad_norm"] is None and metrics["skipped_without_feedback"]

    from pxpo_ext.rewards import RewardOutput

    def first_image_unmarked(images, prompts, metadata):
        weight = torch.ones_like(images[:, 2])
        weight[0] = 0
        return RewardOutput(reward=-images[:, 2], weight=weight)

    trainer = make_trainer(tiny_model, tmp_path / "run2", reward=first_image_unmarked)
    metrics = trainer.step(0)
    trainer.close()
    assert metrics["images_without_feedback"] == 1 and metrics["grad_norm"] > 0
    assert all(math.isfinite(v) for v in (metrics["loss"], metrics["reward_mean"]))


def test_a_batch_without_any_feedback_leaves_the_weights_unchanged(tiny_model, tmp_path):
    from test_trainer import make_trainer

    trainer = make_trainer(tiny_model, tmp_path / "run", reward=_map_reward(weight=0.0))
    before = _weights(trainer)
    metrics = trainer.step(0)
    trainer.close()
    after = _weights(trainer)
    assert all(torch.equal(before[n], after[n]) for n in before)  # no optimiser step: no decay, no momentum
    assert metrics["skipped_without_feedback"] is True and trainer.global_step == 0
    assert metrics["images_without_feedback"] == trainer.samples_per_epoch


def test_mismatched_devices_are_named():
    import pxpo_ext

    x, mean, std = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3), torch.tensor([0.5, 0.5])
    with pytest.raises(ValueError, match="x and mean must be on the same device, got cpu and meta"):
        pxpo_ext.gaussian_logprob(x, mean.to("meta"), std)
    logp, adv = torch.zeros(2, 3, 3), torch.zeros(2, 3, 3)
    with pytest.raises(ValueError, match="advantages is on meta but the latents are on cpu"):
        pxpo_ext.pxpo_loss(x, mean, std, logp, adv.to("meta"), None, 0.1)


@pytest.mark.parametrize("overrides, error, message", [
    ({"train_learning_rate": -1e-3}, ValueError, "train_learning_rate must be a finite number > 0, got -0.001"),
    ({"train_learning_rate": 0.0}, ValueError, "train_learning_rate must be a finite number > 0"),
    ({"train_learning_rate": float("nan")}, ValueError, "train_learning_rate must be a finite number > 0, got nan"),
    ({"train_clip_range": 0.0}, ValueError, "train_clip_range must be > 0"),
    ({"train_clip_range": -0.2}, ValueError, "train_clip_range must be > 0"),
    ({"train_adam_beta1": 1.0}, ValueError, r"train_adam_beta1 must be in \[0, 1\)"),
    ({"train_adam_epsilon": 0.0}, ValueError, "train_adam_epsilon must be a finite number > 0"),
    ({"train_adam_weight_decay": -1.0}, ValueError, "train_adam_weight_decay must be a finite number >= 0"),
    ({"train_max_grad_norm": float("inf")}, ValueError, "train_max_grad_norm must be a finite number >= 0"),
    ({"train_adv_clip_max": 0.0}, ValueError, "train_adv_clip_max must be a finite number > 0"),
    ({"advantage_std_floor": -0.1}, ValueError, "advantage_std_floor must be a finite number >= 0"),
    ({"lora_alpha": -4.0}, ValueError, "lora_alpha must be a finite number > 0"),
    ({"train_lr_warmup_steps": -1}, ValueError, "train_lr_warmup_steps must be an integer >= 0"),
    ({"resolution": 4}, ValueError, "resolution must be at least 8 pixels"),
    ({"sample_batch_size": 0}, ValueError, "sample_batch_size must be a positive integer"),
])
def test_bad_configuration_values_name_the_setting(overrides, error, message):
    from test_trainer import tiny_config

    with pytest.raises(error, match=message):
        tiny_config("unused", "unused", **overrides)


def test_a_latent_size_the_model_cannot_make_is_refused(tiny_model, tmp_path):
    from test_trainer import make_trainer

    with pytest.raises(ValueError, match="resolution=15 must be a multiple of the VAE's factor 2"):
        make_trainer(tiny_model, tmp_path / "run", resolution=15)


def test_an_unknown_reward_name_lists_the_known_ones(tiny_model, tmp_path):
    from test_trainer import tiny_config

    from pxpo_ext.trainer import PXPOTrainer, load_pipeline

    with pytest.raises(KeyError, match="unknown reward 'no_such_reward'; available: .*colour"):
        PXPOTrainer(tiny_config(tiny_model, tmp_path / "run", reward="no_such_reward"), None,
                    lambda: ("x", {}), load_pipeline(tiny_model))


@pytest.mark.parametrize("where", ["a_file/run", "a_file"], ids=["under-a-file", "is-a-file"])
def test_an_output_folder_that_cannot_be_written_fails_before_any_model_loads(tmp_path, where):
    from test_trainer import tiny_config

    from pxpo_ext.trainer import PXPOTrainer
    from pxpo_ext.trainer import checkpoint as ckpt

    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    # model= a folder that does not exist: had the model loaded first, that would be the error
    config = tiny_config(str(tmp_path / "no_model_here"), tmp_path / where)
    with pytest.raises(OSError, match=f"output_dir .*{where}' cannot be written: a file is in the way"):
        PXPOTrainer(config, _blue_reward, lambda: ("x", {}))
    assert blocker.read_text() == "not a folder"
    ckpt.check_writable(tmp_path / "new" / "run")  # a folder that can be made passes, and is not made yet
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]


# ------------------------------------------------------------------ missing, corrupt and foreign checkpoints
def test_a_missing_checkpoint_is_named(trained, tmp_path):
    from test_trainer import make_trainer

    with pytest.raises(FileNotFoundError, match="is neither a checkpoint .* nor a run folder"):
        make_trainer(trained.config.model, tmp_path / "run", resume_from=str(tmp_path / "no_such_run"))


@pytest.mark.parametrize("victim", ["optimizer.pt", "trainable.safetensors", "rng_state_0.pt"])
def test_a_checkpoint_with_a_missing_file_is_named(trained, tmp_path, victim):
    from pxpo_ext.trainer import checkpoint as ckpt

    copy = _copy_checkpoint(trained, tmp_path)
    (copy / victim).unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(victim) + " is missing"):
        ckpt.load_checkpoint(copy)


@pytest.mark.parametrize("victim, damage", [
    ("trainable.safetensors", "truncate"),
    ("optimizer.pt", "truncate"),
    ("stat_tracker.pt", "garbage"),
    ("rng_state_0.pt", "truncate"),
    ("trainer_state.json", "truncate"),
])
def test_a_corrupt_checkpoint_is_named_and_the_trainer_refuses_it(trained, tmp_path, victim, damage):
    from test_trainer import make_trainer

    from pxpo_ext.trainer import checkpoint as ckpt

    copy = _copy_checkpoint(trained, tmp_path)
    data = (copy / victim).read_bytes()
    (copy / victim).write_bytes(data[:len(data) // 2] if damage == "truncate" else b"\x00garbage" * 64)
    with pytest.raises(ValueError, match=f"checkpoint .*checkpoint-1'.*{re.escape(victim)} is corrupt"):
        ckpt.load_checkpoint(copy)
    with pytest.raises(ValueError, match=re.escape(victim) + " is corrupt"):
        make_trainer(trained.config.model, tmp_path / "run", resume_from=str(copy.parent.parent))


class _Payload:
    """Unpickling this would create the file ``target``."""

    def __init__(self, target):
        self.target = str(target)

    def __reduce__(self):
        return (Path(self.target).touch, ())


def test_a_checkpoint_file_that_would_run_code_is_refused_unexecuted(trained, tmp_path):
    from pxpo_ext.trainer import checkpoint as ckpt

    copy = _copy_checkpoint(trained, tmp_path)
    marker = tmp_path / "code_ran"
    torch.save({"state": _Payload(marker), "param_groups": []}, copy / "optimizer.pt")
    with pytest.raises(ValueError, match="optimizer.pt is corrupt or not a pxpo checkpoint file"):
        ckpt.load_checkpoint(copy)
    assert not marker.exists()


def test_a_checkpoint_of_another_model_is_refused(trained, tmp_path):
    """A LoRA trained on another architecture (a text encoder 48 wide instead of 32: every cross-attention
    ``to_k``/``to_v`` adapter has another shape), and one with layers this model does not have."""
    from test_trainer import make_trainer

    copy = _copy_checkpoint(trained, tmp_path)
    weights = load_file(copy / "trainable.safetensors")
    wider = {n: torch.zeros(w.shape[0], 48) if "attn2.to_k.lora_A" in n else w for n, w in weights.items()}
    save_file(wider, copy / "trainable.safetensors")
    resume = str(copy.parent.parent)
    with pytest.raises(ValueError, match=r"does not fit this model's trained parameters \(.*attn2.to_k.lora_A.* "
                                         r"is \(4, 48\) in the checkpoint but \(4, 32\) here\)"):
        make_trainer(trained.config.model, tmp_path / "a", resume_from=resume)
    save_file({**weights, "down_blocks.9.attentions.0.proj.lora_A.weight": torch.zeros(4, 4)},
              copy / "trainable.safetensors")
    with pytest.raises(ValueError, match="1 unknown to this model, e.g. down_blocks.9"):
        make_trainer(trained.config.model, tmp_path / "b", resume_from=resume)
    with pytest.raises(ValueError, match="was trained with use_lora=True, this run has use_lora=False"):
        make_trainer(trained.config.model, tmp_path / "c", resume_from=resume, use_lora=False)


# ------------------------------------------------------------------ LoRA files given to sample.py
def _lora_of_another_unet(folder, **changes) -> Path:
    """A LoRA saved by pxpo for tests/tiny_pipeline.py's UNet with ``changes`` to its configuration."""
    from diffusers import UNet2DConditionModel

    from pxpo_ext.trainer.lora import add_lora, save_lora

    config = {"sample_size": 8, "block_out_channels": (32, 64), "layers_per_block": 1, "cross_attention_dim": 32,
              "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
              "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"), "attention_head_dim": 8, "norm_num_groups": 32}
    unet = UNet2DConditionModel(**{**config, **changes})
    add_lora(unet, rank=4)
    save_lora(unet, folder, rank=4)
    return Path(folder)


def _lora_file(folder, weights: dict) -> Path:
    Path(folder).mkdir()
    save_file(weights, Path(folder) / "pytorch_lora_weights.safetensors")
    return Path(folder)


_TEXT_LAYER = "text_encoder.text_model.encoder.layers.0.self_attn.q_proj"


@pytest.mark.parametrize("make, message", [
    (lambda folder: _lora_of_another_unet(folder, cross_attention_dim=48),
     (r"it targets unet\.down_blocks\.0\.attentions\.0\.transformer_blocks\.0\.attn2\.to_k\.lora_A\.weight with "
      r"shape \(4, 48\) but this model's layer needs \(4, 32\) \(8 of its 64 weights do not fit\)")),
    (lambda folder: _lora_of_another_unet(folder, layers_per_block=2),
     (r"it targets unet\.down_blocks\.0\.attentions\.1\.transformer_blocks\.0\.attn1\.to_k, which this model does "
      r"not have \(32 of its 96 weights target missing layers\)")),
    (lambda folder: _lora_file(folder, {f"{_TEXT_LAYER}.lora_A.weight": torch.zeros(4, 48),
                                        f"{_TEXT_LAYER}.lora_B.weight": torch.zeros(32, 4)}),
     (r"it targets text_encoder\..*q_proj\.lora_A\.weight with shape \(4, 48\) but this model's layer needs "
      r"\(4, 32\) \(1 of its 2 weights do not fit\)")),
    (lambda folder: _lora_file(folder, {"transformer.blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, 32),
                                        "transformer.blocks.0.attn.to_q.lora_B.weight": torch.zeros(32, 4)}),
     r"2 of its 2 weights are for no part of this pipeline, e.g. 'transformer\.blocks\.0\.attn\.to_q\.lora_A\.weight'"),
], ids=["wider-cross-attention", "more-layers", "wider-text-encoder", "another-kind-of-model"])
def test_a_lora_for_another_architecture_is_refused_before_it_loads(trained, tmp_path, make, message):
    """diffusers alone loads "more-layers" and "another-kind-of-model" without an error (it skips what does not
    fit) and fails on "wider-cross-attention" with a raw state_dict traceback."""
    from pxpo_ext.trainer import load_pipeline
    from pxpo_ext.trainer.lora import load_lora

    other = make(tmp_path / "lora")
    pipe = load_pipeline(trained.config.model)
    with pytest.raises(ValueError, match=rf"LoRA '.*pytorch_lora_weights.safetensors' does not fit this model: "
                                         rf"{message}; it was trained for another model"):
        load_lora(pipe, other)
    assert not getattr(pipe.unet, "peft_config", None)  # nothing was loaded
    load_lora(pipe, Path(trained.config.output_dir) / "lora")  # the LoRA trained on this model fits
    assert list(pipe.unet.peft_config) == ["default_0"]


def test_sample_py_names_a_lora_for_another_model(trained, tmp_path):
    from pxpo_ext import cli

    other = _lora_of_another_unet(tmp_path / "lora", cross_attention_dim=48)
    out = tmp_path / "grid.png"
    with pytest.raises(SystemExit, match=r"^sample\.py: error: LoRA .* does not fit this model: it targets "
                                         r"unet\..*attn2\.to_k\.lora_A\.weight with shape \(4, 48\)"):
        cli.sample_main(["--model", trained.config.model, "--prompt", "a red circle", "--num-steps", "1",
                         "--lora", str(other), "--out", str(out)])
    assert not out.exists()


@pytest.mark.parametrize("damage, message", [
    ("truncate", "is corrupt or not a safetensors file"),
    ("garbage", "is corrupt or not a safetensors file"),
    ("no-file", "has no pytorch_lora_weights.safetensors; pass the folder train.py wrote"),
    ("not-a-lora", "is not a LoRA file: 'conv_in.weight' is not a LoRA weight"),
])
def test_a_missing_or_corrupt_lora_is_named_before_any_model_loads(trained, tmp_path, capsys, monkeypatch, damage,
                                                                   message):
    import shutil

    from pxpo_ext import cli

    def no_model_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the LoRA file was checked")

    monkeypatch.setattr(cli, "_load_model", no_model_load)

    folder = tmp_path / "lora"
    shutil.copytree(Path(trained.config.output_dir) / "lora", folder)
    file = folder / "pytorch_lora_weights.safetensors"
    if damage == "truncate":
        file.write_bytes(file.read_bytes()[:200])
    elif damage == "garbage":
        file.write_bytes(b"\x00garbage" * 64)
    elif damage == "no-file":
        file.unlink()
    else:
        save_file({"conv_in.weight": torch.zeros(4, 4, 3, 3)}, file)
    with pytest.raises(SystemExit) as exit_info:
        cli.sample_main(["--model", trained.config.model, "--prompt", "x", "--lora", str(folder),
                         "--out", str(tmp_path / "grid.png")])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


# ------------------------------------------------------------------ failed writes damage nothing
def _disk_fills_after_half(real):
    """A writer that writes half its file, then fails as a full disk does."""

    def write(obj, path, *args, **kwargs):
        buffer = io.BytesIO()
        real(obj, buffer, *args, **kwargs)
        data = buffer.getvalue()
        Path(path).write_bytes(data[:len(data) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    return write


@pytest.mark.parametrize("name", ["checkpoint-2", "checkpoint-1"], ids=["new", "re-save"])
def test_a_disk_that_fills_during_a_checkpoint_leaves_the_previous_one_intact(trained, monkeypatch, name):
    from pxpo_ext.trainer import checkpoint as ckpt

    run = Path(trained.config.output_dir)
    before = _files(run / "checkpoints")
    monkeypatch.setattr(torch, "save", _disk_fills_after_half(torch.save))
    with pytest.raises(OSError, match=f"could not write checkpoint .*{name}': the disk is full") as failure:
        trained.save_checkpoint(run / "checkpoints" / name)
    assert failure.value.errno == errno.ENOSPC
    assert _files(run / "checkpoints") == before  # nothing half-written left, checkpoint-1 byte-identical
    assert [p.name for p in ckpt.list_checkpoints(run)] == ["checkpoint-1"]


def test_a_full_disk_reported_by_safetensors_is_named_too(trained, monkeypatch, tmp_path):
    from safetensors import SafetensorError

    from pxpo_ext.trainer import checkpoint as ckpt

    def fail(*args, **kwargs):
        raise SafetensorError('Error while serializing: I/O error: No space left on device (os error 28) at path "x"')

    monkeypatch.setattr(ckpt, "save_file", fail)
    with pytest.raises(OSError, match="checkpoint-7': the disk is full"):
        trained.save_checkpoint(tmp_path / "checkpoints" / "checkpoint-7")
    assert list((tmp_path / "checkpoints").iterdir()) == []


def test_a_disk_that_fills_while_saving_the_lora_keeps_the_previous_file(trained, monkeypatch):
    import pxpo_ext.trainer.trainer as trainer_module

    lora = Path(trained.config.output_dir) / "lora"
    before = _files(lora)
    real = trainer_module.save_lora

    def save_lora_then_fill(unet, folder, *args):
        real(unet, folder, *args)
        target = Path(folder) / "pytorch_lora_weights.safetensors"
        target.write_bytes(target.read_bytes()[:100])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(trainer_module, "save_lora", save_lora_then_fill)
    with pytest.raises(OSError, match="could not write weights to .*lora': the disk is full"):
        trained.save_pretrained(lora)
    assert _files(lora) == before


class _Killed(BaseException):
    """Stands for SIGKILL: nothing catches it, so no clean-up runs."""


def _checkpoint_with_failing_swap(tmp_path, monkeypatch, error: BaseException):
    """A first checkpoint-1 (w = 0), then Path.rename patched to raise ``error`` once the old copy is moved aside
    (when the new copy, ``.checkpoint-1.tmp``, is renamed into place). Returns (accelerator, save arguments, folder)."""
    from accelerate import Accelerator

    from pxpo_ext.trainer import checkpoint as ckpt

    acc = Accelerator(cpu=True)
    args = {"optimizer": {}, "lr_scheduler": {}, "stat_tracker": {}, "rng_state": ckpt.capture_rng()}
    folder = tmp_path / "checkpoints" / "checkpoint-1"
    ckpt.save_checkpoint(folder, acc, trainable={"w": torch.zeros(2)}, trainer_state={"epoch": 1}, **args)
    real_rename = Path.rename

    def rename(self, target):
        if Path(self).name == ".checkpoint-1.tmp":
            raise error
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", rename)
    return acc, args, folder


def test_a_crash_between_the_renames_of_a_re_save_keeps_a_complete_copy(tmp_path, monkeypatch):
    from pxpo_ext.trainer import checkpoint as ckpt

    acc, args, folder = _checkpoint_with_failing_swap(tmp_path, monkeypatch, _Killed())
    with pytest.raises(_Killed):
        ckpt.save_checkpoint(folder, acc, trainable={"w": torch.ones(2)}, trainer_state={"epoch": 1}, **args)
    monkeypatch.undo()
    assert not folder.exists()
    found = ckpt.list_checkpoints(tmp_path)
    assert [p.name for p in found] == [".checkpoint-1.old"] and ckpt.resolve(tmp_path) == found[0]
    assert torch.equal(ckpt.load_checkpoint(tmp_path)["trainable"]["w"], torch.zeros(2))
    # the next save of that epoch completes normally and tidies up
    ckpt.save_checkpoint(folder, acc, trainable={"w": torch.ones(2)}, trainer_state={"epoch": 1}, **args)
    assert sorted(p.name for p in folder.parent.iterdir()) == ["checkpoint-1"]


def test_a_failed_swap_puts_the_previous_copy_back(tmp_path, monkeypatch):
    from pxpo_ext.trainer import checkpoint as ckpt

    acc, args, folder = _checkpoint_with_failing_swap(tmp_path, monkeypatch, OSError(errno.EIO, os.strerror(errno.EIO)))
    with pytest.raises(OSError, match="could not write checkpoint .*checkpoint-1': Input/output error"):
        ckpt.save_checkpoint(folder, acc, trainable={"w": torch.ones(2)}, trainer_state={"epoch": 1}, **args)
    monkeypatch.undo()
    assert sorted(p.name for p in folder.parent.iterdir()) == ["checkpoint-1"]
    assert torch.equal(ckpt.load_checkpoint(folder)["trainable"]["w"], torch.zeros(2))


# ------------------------------------------------------------------ files
def _sources():
    return sorted((ROOT / "pxpo_ext").rglob("*.py")) + sorted((ROOT / "python").glob("*.py"))


def test_nothing_is_unpickled_from_disk():
    """Every ``torch.load`` passes ``weights_only=True``; no pickle, no ``numpy.load(allow_pickle=True)``."""
    offenders, calls = [], 0
    for path in _sources():
        text = path.read_text(encoding="utf-8")
        for match in re.finditer(r"torch\.load\(", text):
            calls += 1
            depth = 0  # the whole call, up to its closing parenthesis
            for end in range(match.end() - 1, len(text)):
                depth += {"(": 1, ")": -1}.get(text[end], 0)
                if depth == 0:
                    break
            call = text[match.start():end + 1]
            if "weights_only=True" not in call:
                offenders.append(f"{path.relative_to(ROOT)}: {call}")
        for pattern in (r"\bpickle\.loads?\(", r"allow_pickle\s*=\s*True", r"\bdill\.", r"\bjoblib\.load"):
            offenders += [f"{path.relative_to(ROOT)}: {m.group(0)}" for m in re.finditer(pattern, text)]
    assert not offenders, offenders
    assert calls > 0  # the checkpoint loader's own calls were seen: the scan looks where it should


def test_weights_are_written_as_safetensors_only(trained):
    """``torch.save`` appears only in the checkpoint module, for optimiser/schedule/tracker/RNG state (tensors
    and numbers, read back with weights_only=True); every weight file is safetensors."""
    users = [str(p.relative_to(ROOT)) for p in _sources() if "torch.save(" in p.read_text(encoding="utf-8")]
    assert users == ["pxpo_ext/trainer/checkpoint.py"], users
    run = Path(trained.config.output_dir)
    assert [p.name for p in (run / "lora").iterdir()] == ["pytorch_lora_weights.safetensors"]
    assert {p.suffix for p in _checkpoint(trained).iterdir()} == {".safetensors", ".pt", ".json"}
    assert {p.name for p in _checkpoint(trained).glob("*.safetensors")} == {"trainable.safetensors",
                                                                          "pytorch_lora_weights.safetensors"}


def test_the_feedback_server_binds_loopback_unless_told_otherwise():
    import inspect

    from pxpo_ext.feedback import cli, server

    assert inspect.signature(server.start_server).parameters["host"].default == "127.0.0.1"
    assert inspect.signature(server.FeedbackServer).parameters["host"].default == "127.0.0.1"
    source = inspect.getsource(cli)
    assert re.search(r'add_argument\("--host", default="127\.0\.0\.1"', source)


@pytest.fixture
def served(tmp_path):
    from test_feedback import StandInTrainer

    from pxpo_ext.feedback import FeedbackSession, start_server
    from pxpo_ext.rewards import HumanFeedbackReward

    trainer = StandInTrainer()
    trainer.reward_fn = HumanFeedbackReward()
    session = FeedbackSession(trainer, trainer.reward_fn, "a red circle", 3, tmp_path, epochs_per_round=1)
    server = start_server(session, port=0)
    yield server, session, trainer
    server.shutdown()
    server.server_close()


def test_the_feedback_server_listens_on_loopback(served):
    assert served[0].server_address[0] == "127.0.0.1"


@pytest.mark.parametrize("path", ["/static/..%2fserver.py", "/static/%2e%2e%2fserver.py", "/static/app.js/../../server.py",
                                  "/static/....//server.py", "/static/..\\server.py", "/static/%2fetc%2fpasswd",
                                  "/..", "/static/../../../../../../etc/passwd"])
def test_no_file_outside_the_static_folder_by_encoded_paths(served, path):
    from test_feedback import request

    status, _, body = request(served[0], "GET", path)
    assert status == 404 and b"import" not in body and b"root:" not in body


def test_marks_with_huge_dimensions_are_refused_before_decoding(served):
    """A small PNG that claims 5000x5000 pixels (a decompression bomb) is refused from its header."""
    from PIL import Image
    from test_feedback import request

    buffer = io.BytesIO()
    Image.new("1", (5000, 5000)).save(buffer, format="PNG")
    assert len(buffer.getvalue()) < 100_000
    status, _, body = request(served[0], "POST", "/api/feedback", buffer.getvalue(), {"Content-Type": "image/png"})
    assert status == 400 and "5000x5000" in json.loads(body)["error"] and "refused" in json.loads(body)["error"]
    assert served[1].round == 0


def test_an_upload_without_a_length_is_refused_unread(served):
    """A chunked body has no Content-Length to check against the cap: it is refused (411) before reading."""
    import http.client

    connection = http.client.HTTPConnection(*served[0].server_address[:2], timeout=30)
    # Headers only: the server answers before any body is read, so sending one would race its close.
    connection.putrequest("POST", "/api/feedback")
    connection.putheader("Content-Type", "image/png")
    connection.putheader("Transfer-Encoding", "chunked")
    connection.endheaders()
    answer = connection.getresponse()
    body = json.loads(answer.read())
    connection.close()
    assert answer.status == 411 and "Content-Length" in body["error"]
    assert served[1].round == 0


def test_a_full_disk_on_save_is_answered_not_dropped(served):
    from test_feedback import request

    server, _, trainer = served

    def full(folder):
        raise OSError(errno.ENOSPC, f"could not write weights to {str(folder)!r}: the disk is full")

    trainer.save_pretrained = full
    status, _, body = request(server, "POST", "/api/save", b"")
    assert status == 507 and "the disk is full" in json.loads(body)["error"]
    assert request(server, "GET", "/api/state")[0] == 200  # still serving


if __name__ == "__main__":
    _driver(*sys.argv[1:4])
