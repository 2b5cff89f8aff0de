"""End-to-end tests of the PXPO/DDPO trainer on a tiny Stable-Diffusion pipeline built from configs.

The model is ``conftest.tiny_model``: a random-weight SD pipeline (8x8 latents, 16x16 images) built
from configs by ``tiny_pipeline.build_tiny_pipeline``, offline.
"""

import pytest
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from tiny_pipeline import build_tiny_pipeline

from pxpo_ext.trainer import PXPOConfig, PXPOTrainer, load_pipeline
from pxpo_ext.trainer.trainer import BLOCK_RECOMPILE_LIMIT

PROMPT = "a red circle on a blue background"


def tiny_config(model: str, output_dir, **overrides) -> PXPOConfig:
    """A few-second run: 2 images, 3 DDIM steps, one minibatch per epoch."""
    settings = {"model": model, "output_dir": str(output_dir), "seed": 0, "num_epochs": 1, "sample_num_steps": 3,
                    "sample_batch_size": 2, "sample_num_batches_per_epoch": 1, "train_batch_size": 2,
                    "per_prompt_stat_tracking": False, "num_eval_images": 0, "save_freq": 0, "log_images_every": 0,
                    "use_tensorboard": False, "reward_workers": 1}
    settings.update(overrides)
    return PXPOConfig(**settings)


def blue_reward(images, prompts, metadata):
    """Per-pixel 'less blue' reward maps (B, H, W)."""
    return -images[:, 2]


def constant_map_reward(images, prompts, metadata):
    """Each image's mean brightness, as a constant map: pxpo and ddpo see the same information."""
    value = images.mean(dim=(1, 2, 3))
    return value.view(-1, 1, 1).expand(-1, images.shape[2], images.shape[3]).clone()


def fixed_prompt():
    return PROMPT, {}


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)


def make_trainer(model, output_dir, reward=blue_reward, prompt_fn=fixed_prompt, **overrides) -> PXPOTrainer:
    return PXPOTrainer(tiny_config(model, output_dir, **overrides), reward, prompt_fn, load_pipeline(model))


@pytest.mark.parametrize("algorithm", ["pxpo", "ddpo"])
def test_end_to_end_run_is_on_policy_at_first_step(tiny_model, tmp_path, algorithm):
    trainer = make_trainer(tiny_model, tmp_path / "run", algorithm=algorithm, num_epochs=2, num_eval_images=2,
                           train_num_inner_epochs=2, log_images_every=1)
    history = trainer.train()
    trainer.close()
    assert [m["epoch"] for m in history] == [0, 1]
    assert history[-1]["samples_seen"] == 4 and trainer.global_step == 4  # 2 epochs x 2 inner epochs x 1 step
    for m in history:
        for key in ("reward_mean", "reward_std", "approx_kl", "clipfrac", "seconds", "loss"):
            assert isinstance(m[key], float) and m[key] == m[key], key
        assert m["skipped_overflow_units"] == 0 and m["skipped_optimizer_steps"] == 0
    stats = trainer.last_train_stats  # 2 inner epochs x 3 timesteps of one minibatch, one optimiser step each
    assert stats[0]["approx_kl"] == 0.0 and stats[0]["clipfrac"] == 0.0  # the ratio is exactly 1 before any update
    # the update lowers the surrogate loss on the same rollouts: the gradient's sign reaches the optimiser intact
    assert sum(s["loss"] for s in stats[3:]) < sum(s["loss"] for s in stats[:3])
    if algorithm == "ddpo":
        assert trainer.config.clip_range == 1e-4
    run = tmp_path / "run"
    assert (run / "lora" / "pytorch_lora_weights.safetensors").is_file()
    assert (run / "metrics.jsonl").read_text().count("\n") == 2
    for name in ("samples_before.png", "samples_after.png", "reward_curve.png"):
        assert (run / name).is_file(), name
    assert (run / "checkpoints" / "checkpoint-2" / "trainer_state.json").is_file()


def test_optimizer_steps_skipped_by_the_gradient_scaler_are_counted(tiny_model, tmp_path, monkeypatch, caplog):
    # fp16's GradScaler (CUDA only) skips a step whose gradient overflowed; stand in for it on the CPU.
    from accelerate import Accelerator

    monkeypatch.setattr(Accelerator, "optimizer_step_was_skipped", property(lambda self: True))
    trainer = make_trainer(tiny_model, tmp_path / "run", num_epochs=1, train_num_inner_epochs=2)
    with caplog.at_level("WARNING", logger="pxpo_ext.trainer.trainer"):
        (metrics,) = trainer.train()
    trainer.close()
    assert metrics["skipped_optimizer_steps"] == 2  # 2 inner epochs of one minibatch: one optimiser step each
    assert "2 of 2 optimiser step(s) skipped" in caplog.text


def test_constant_reward_maps_give_c_times_ddpo_gradient(tiny_model, tmp_path):
    grads, advantages = {}, {}
    for algorithm in ("pxpo", "ddpo"):
        trainer = make_trainer(tiny_model, tmp_path / algorithm, reward=constant_map_reward, algorithm=algorithm)
        rollouts = trainer.compute_advantages(trainer.sample_epoch())
        batch = {k: rollouts[k] for k in ("embeds", "latents", "log_probs", "timesteps", "advantages", "weights")}
        stats = trainer.backward_timestep(batch, torch.tensor([1, 1]))
        assert stats["approx_kl"] == 0.0
        grads[algorithm] = {n: p.grad.clone() for n, p in trainer._unwrapped_unet.named_parameters()
                            if p.requires_grad and p.grad is not None}
        advantages[algorithm] = rollouts["advantages"]
        trainer.close()
    torch.testing.assert_close(advantages["pxpo"], advantages["ddpo"].view(-1, 1, 1).expand_as(advantages["pxpo"]))
    channels = 4
    assert grads["pxpo"].keys() == grads["ddpo"].keys() and grads["pxpo"]
    total = sum(g.abs().sum() for g in grads["ddpo"].values())
    assert total > 0
    for name, g in grads["pxpo"].items():
        torch.testing.assert_close(g, channels * grads["ddpo"][name], rtol=1e-4, atol=1e-9 * total.item())


def test_lora_loads_into_a_fresh_pipeline(tiny_model, tmp_path):
    trainer = make_trainer(tiny_model, tmp_path / "run", train_learning_rate=3e-2, num_epochs=2)
    trainer.train()
    trainer.close()
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([500])
    with torch.no_grad():
        emb = trainer.pipeline.encode_prompt([PROMPT], "cpu", 1, False)[0]
        trained = trainer._unwrapped_unet(x, t, encoder_hidden_states=emb).sample
        fresh = StableDiffusionPipeline.from_pretrained(tiny_model, safety_checker=None)
        base = fresh.unet(x, t, encoder_hidden_states=emb).sample
        fresh.load_lora_weights(str(tmp_path / "run" / "lora"))
        loaded = fresh.unet(x, t, encoder_hidden_states=emb).sample
    assert (trained - base).abs().max() > 1e-4  # training moved the model
    torch.testing.assert_close(loaded, trained, rtol=1e-4, atol=1e-5)


def test_generate_is_deterministic_and_seed_metadata_fixes_initial_noise(tiny_model, tmp_path):
    trainer = make_trainer(tiny_model, tmp_path / "run", prompt_fn=lambda: (PROMPT, {"seed": 7}))
    a = trainer.generate([PROMPT, "a blue star"], [3, 4])
    assert torch.equal(a, trainer.generate([PROMPT, "a blue star"], [3, 4]))
    b = trainer.generate(["a blue star"], [4])
    assert a.shape == (2, 3, 16, 16) and 0 <= a.min() and a.max() <= 1
    # an image does not depend on the rest of its batch (up to batch-size-dependent kernel rounding)
    torch.testing.assert_close(a[1:], b, rtol=0, atol=1e-5)
    rollouts = trainer.sample_epoch()
    expected = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(7))
    assert torch.equal(rollouts["latents"][0, 0], expected[0]) and torch.equal(rollouts["latents"][1, 0], expected[0])
    trainer.close()


def test_same_trajectory_metadata_replays_the_generated_image(tiny_model, tmp_path):
    """Feedback on one image must train on that image's trajectory: the rollout equals generate()'s image."""
    meta = {"seed": 11, "same_trajectory": True}
    trainer = make_trainer(tiny_model, tmp_path / "run", prompt_fn=lambda: (PROMPT, dict(meta)))
    shown = trainer.generate([PROMPT], [11])
    rollouts = trainer.sample_epoch()
    torch.testing.assert_close(rollouts["images"], shown.expand_as(rollouts["images"]), rtol=0, atol=1e-5)
    trainer.close()


def test_full_fine_tuning_and_sf_loss(tiny_model, tmp_path):
    trainer = make_trainer(tiny_model, tmp_path / "run", use_lora=False, loss_type="sf", train_timestep_fraction=0.5)
    before = {n: p.detach().clone() for n, p in trainer._unwrapped_unet.named_parameters()}
    metrics = trainer.train()[0]
    trainer.close()
    assert metrics["trained_timesteps"] == 1
    moved = sum(not torch.equal(before[n], p) for n, p in trainer._unwrapped_unet.named_parameters())
    assert moved > 0
    assert (tmp_path / "run" / "unet" / "config.json").is_file()


@pytest.mark.parametrize("use_lora", [True, False])
def test_kl_penalty_starts_at_zero_and_leaves_the_reference_untouched(tiny_model, tmp_path, use_lora):
    trainer = make_trainer(tiny_model, tmp_path / "run", use_lora=use_lora, train_kl_coef=1.0, num_epochs=2)
    reference = trainer.reference_unet
    frozen = {n: p.detach().clone() for n, p in reference.named_parameters()} if reference is not None else None
    history = trainer.train()
    # Epoch 0 trains before the first optimiser step: the policy is the initial model, bit for bit.
    assert history[0]["reference_kl"] == 0.0
    assert history[1]["reference_kl"] > 0
    if use_lora:  # the reference is the UNet with its adapters off; they must be on again for sampling
        assert reference is None
        assert not any(getattr(m, "disable_adapters", False) for m in trainer._unwrapped_unet.modules()
                       if hasattr(m, "lora_A"))
    else:
        assert all(torch.equal(frozen[n], p) for n, p in reference.named_parameters())
        assert not any(p.requires_grad for p in reference.parameters())
    trainer.close()


def test_kl_penalty_turned_on_after_building_a_full_fine_tuning_trainer_says_what_to_do(tiny_model, tmp_path):
    trainer = make_trainer(tiny_model, tmp_path / "run", use_lora=False)
    trainer.config.train_kl_coef = 1.0
    with pytest.raises(RuntimeError, match="set train_kl_coef in PXPOConfig before building the trainer"):
        trainer.step(0)
    trainer.close()


def test_kl_penalty_keeps_the_model_closer_to_the_initial_one(tiny_model, tmp_path):
    seeds = [0, 1]
    base = make_trainer(tiny_model, tmp_path / "base")
    start = base.generate([PROMPT] * 2, seeds)
    base.close()
    drift = {}
    for coef in (0.0, 100.0):
        trainer = make_trainer(tiny_model, tmp_path / f"kl{coef}", train_kl_coef=coef, num_epochs=4,
                               train_learning_rate=1e-2)
        history = trainer.train()
        assert (history[-1]["reference_kl"] is None) == (coef == 0)
        drift[coef] = (trainer.generate([PROMPT] * 2, seeds) - start).pow(2).mean().sqrt().item()
        trainer.close()
    assert drift[100.0] < 0.5 * drift[0.0], drift


def test_deterministic_final_step_is_left_out(tmp_path):
    model = build_tiny_pipeline(tmp_path / "model", set_alpha_to_one=True)
    trainer = make_trainer(model, tmp_path / "run")
    metrics = trainer.step(0)
    trainer.close()
    assert metrics["skipped_deterministic_steps"] == 1 and metrics["trained_timesteps"] == 2


def test_reward_errors_name_the_function(tiny_model, tmp_path):
    def bad_reward(images, prompts, metadata):
        return torch.zeros(len(prompts), 5, 5)

    trainer = make_trainer(tiny_model, tmp_path / "run", reward=bad_reward)
    with pytest.raises(ValueError, match="bad_reward"):
        trainer.step(0)
    trainer.close()


def _first_minibatch(trainer):
    rollouts = trainer.compute_advantages(trainer.sample_epoch())
    batch = {k: rollouts[k] for k in ("embeds", "latents", "log_probs", "timesteps", "advantages", "weights")}
    return batch, trainer.train_step_indices[:1].expand(len(rollouts["prompts"]))


def _scale_outputs(graph, example_inputs):
    """A torch.compile backend that miscompiles on purpose: every output of the graph x 1.5."""
    def run(*args):
        return [o * 1.5 if isinstance(o, torch.Tensor) and o.is_floating_point() else o for o in graph(*args)]
    return run


@pytest.mark.parametrize("backend, agrees", [("aot_eager", True), (_scale_outputs, False)])
def test_compiled_gradient_is_checked_against_eager(tiny_model, tmp_path, backend, agrees):
    trainer = make_trainer(tiny_model, tmp_path / "run")
    batch, index = _first_minibatch(trainer)
    trainer._unwrapped_unet.compile(backend=backend, dynamic=False)
    if agrees:
        assert trainer.check_compiled_gradient(batch, index) < 1e-5
    else:
        with pytest.raises(RuntimeError, match="differs from the eager one by .*train with compile_unet=.no."):
            trainer.check_compiled_gradient(batch, index)
    assert all(p.grad is None for p in trainer.params)  # the check leaves nothing to be stepped
    trainer.close()


def test_gradient_check_inside_an_accumulation_window(tiny_model, tmp_path):
    """Training runs the check on its first micro-step, inside ``accelerator.accumulate`` and off the sync
    boundary, where accelerate's ``optimizer.zero_grad`` does nothing: the check must still compare one eager
    and one compiled gradient (not their sum; a correct compiler once failed it by 100%) and hand back the
    gradient it found."""
    trainer = make_trainer(tiny_model, tmp_path / "run")
    assert trainer.accelerator.gradient_accumulation_steps > 1
    batch, index = _first_minibatch(trainer)
    trainer._unwrapped_unet.compile(backend="aot_eager", dynamic=False)
    with trainer.accelerator.accumulate(trainer.unet):
        assert not trainer.accelerator.sync_gradients
        with torch.compiler.set_stance("force_eager"):
            trainer.backward_timestep(batch, index)  # a gradient already accumulated before the check
        before = [p.grad.clone() for p in trainer.params]
        assert trainer.check_compiled_gradient(batch, index) < 1e-5
        assert all(torch.equal(p.grad, b) for p, b in zip(trainer.params, before))
    trainer.close()


@pytest.mark.parametrize("scope", ["unet", "blocks"])
def test_compile_unet_trains_only_on_a_checked_gradient(tiny_model, tmp_path, scope):
    """compile_unet with the real compiler: the first micro-step checks the compiled gradient, so an epoch either
    trains on one that matches eager or stops with the check's error. torch 2.13's CPU inductor miscompiles this
    whole UNet's backward (some LoRA layers get zero gradient); its blocks compiled alone are right, and
    ``compile_scope="blocks"`` must then train."""
    trainer = make_trainer(tiny_model, tmp_path / "run", compile_unet="default", compile_scope=scope)
    try:
        trainer.step(0)
    except RuntimeError as error:
        assert scope == "unet" and "differs from the eager one" in str(error)
    else:
        assert trainer.global_step == 1
    finally:
        trainer.close()


def test_compile_scope_blocks_needs_named_blocks(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setattr(UNet2DConditionModel, "_repeated_blocks", [])
    with pytest.raises(ValueError, match="names none. Use compile_scope='unet'"):
        make_trainer(tiny_model, tmp_path / "run", compile_unet="default", compile_scope="blocks")


@pytest.mark.parametrize("scope", ["unet", "blocks"])
@torch._dynamo.config.patch(recompile_limit=BLOCK_RECOMPILE_LIMIT)  # as the trainer sets it for "blocks"
def test_kl_penalty_under_compile_sees_the_adapters_switched_off(tiny_model, tmp_path, scope):
    """A compiled UNet must not keep running the adapters when the reference forward turns them off (the
    compiler has to guard on the switch; with ``compile_scope="blocks"`` the adapters sit inside the compiled
    blocks): the compiled run's KL history equals the eager one's."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()  # reset() keeps them; the assertion below must see this test's graphs
    history = {}
    for compiled in (False, True):
        trainer = make_trainer(tiny_model, tmp_path / f"run{compiled}", train_kl_coef=1.0, num_epochs=2,
                               train_learning_rate=1e-2)
        unet = trainer._unwrapped_unet
        if compiled and scope == "blocks":
            unet.compile_repeated_blocks(backend="aot_eager", dynamic=False)
        elif compiled:
            unet.compile(backend="aot_eager", dynamic=False)
        history[compiled] = [m["reference_kl"] for m in trainer.train()]
        trainer.close()
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0  # the compiled run did run compiled code
    assert history[False][0] == 0 and history[False][1] > 0
    assert history[True] == pytest.approx(history[False], rel=1e-4, abs=1e-9)


@pytest.mark.parametrize("overrides, message", [
    ({"algorithm": "ppo"}, "algorithm"),
    ({"sample_eta": 0.0}, "eta"),
    ({"loss_type": "sf", "train_num_inner_epochs": 2}, "sf"),
    ({"train_batch_size": 3}, "train_batch_size"),
    ({"train_gradient_accumulation_steps": 2}, "accumulation"),
    ({"compile_unet": "yes"}, "compile_unet"),
    ({"compile_scope": "layers"}, "compile_scope"),
    ({"train_kl_coef": -0.1}, "train_kl_coef"),
])
def test_config_errors_say_what_to_change(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_config("unused", "unused", **overrides)


def test_embedded_model_end_to_end(tmp_path):
    embedded = pytest.importorskip("pxpo_ext.embedded", reason="pxpo_ext.embedded is not in this checkout")
    if not (embedded.pipeline_path() / "model_index.json").is_file():
        pytest.skip(f"the embedded model's weights are not at {embedded.pipeline_path()} yet")
    pipe = embedded.load_pipeline()
    config = tiny_config(None, tmp_path / "run", sample_num_steps=4)
    trainer = PXPOTrainer(config, blue_reward, fixed_prompt, pipe)
    metrics = trainer.train()[0]
    trainer.close()
    assert metrics["approx_kl"] >= 0 and trainer.last_train_stats[0]["approx_kl"] == 0.0
    assert (tmp_path / "run" / "lora" / "pytorch_lora_weights.safetensors").is_file()
