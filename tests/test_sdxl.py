"""SDXL pipelines: conditioning with the pooled embedding and time ids, training, the VAE's dtype.

That the trainer samples the images StableDiffusionXLPipeline draws is tested with SD's in test_cli.py."""
import pytest
import torch

from pxpo_ext import cli
from pxpo_ext.trainer import PXPOConfig, PXPOTrainer, load_pipeline
from pxpo_ext.trainer.sampling import TextConditioning, encode_prompts, negative_conditioning
from pxpo_ext.trainer.trainer import vae_dtype


def small_config(model, folder, **extra) -> PXPOConfig:
    return PXPOConfig(model=model, output_dir=str(folder), sample_num_steps=3, sample_batch_size=2,
                      sample_num_batches_per_epoch=1, train_batch_size=2, train_gradient_accumulation_steps=1,
                      use_tensorboard=False, num_eval_images=0, reward_workers=1, **extra)


def test_the_conditioning_holds_the_pooled_embedding_and_the_image_size(tiny_sdxl):
    pipe = load_pipeline(tiny_sdxl)
    cond = encode_prompts(pipe, ["a red circle", "a blue square"], "cpu", image_size=16)
    assert cond.hidden_states.shape == (2, 77, 64)  # both encoders' hidden states side by side
    assert cond.pooled.shape == (2, 16)
    assert cond.time_ids.tolist() == [[16, 16, 0, 0, 16, 16]] * 2  # original size, crop corner, target size
    negative = negative_conditioning(pipe, "cpu", image_size=16)
    assert not negative.hidden_states.any() and not negative.pooled.any()  # force_zeros_for_empty_prompt
    rows = TextConditioning.cat([cond, negative.expand(3)])[1:4]
    assert len(rows) == 3 and rows.pooled.shape == (3, 16) and rows.time_ids.shape == (3, 6)
    with pytest.raises(ValueError, match="needs the image size"):
        encode_prompts(pipe, ["x"], "cpu")


def test_train_py_trains_an_sdxl_lora_that_diffusers_loads(tiny_sdxl, tmp_path):
    run = tmp_path / "run"
    trainer = cli.train_main([
        "--model", tiny_sdxl, "--output-dir", str(run), "--num-epochs", "2", "--sample-num-steps", "2",
        "--sample-batch-size", "2", "--sample-num-batches-per-epoch", "1", "--train-batch-size", "2",
        "--prompts", "text:a red circle", "--num-eval-images", "1", "--save-freq", "0", "--reward-workers", "1",
        "--no-use-tensorboard", "--train-learning-rate", "0.05", "--train-gradient-accumulation-steps", "1",
    ])
    assert trainer.epoch == 2 and trainer.global_step == 2
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in trainer.params)
    common = ["--model", tiny_sdxl, "--prompt", "a red circle", "--num-steps", "2", "--seed", "0"]
    base = cli.sample_main([*common, "--out", str(tmp_path / "base.png")])
    tuned = cli.sample_main([*common, "--lora", str(run / "lora"), "--out", str(tmp_path / "tuned.png")])
    assert not torch.allclose(base, tuned)  # StableDiffusionXLPipeline.load_lora_weights took the adapter


def test_a_kl_penalty_and_full_fine_tuning_run_on_sdxl(tiny_sdxl, tmp_path):
    config = small_config(tiny_sdxl, tmp_path / "run", num_epochs=1, train_kl_coef=1.0, use_lora=False,
                          prompts="text:a red circle")
    trainer = PXPOTrainer(config, None, None, load_pipeline(tiny_sdxl))
    try:
        metrics = trainer.step(0)
    finally:
        trainer.close()
    assert metrics["reference_kl"] is not None and metrics["reference_kl"] >= 0


def test_only_an_sdxl_vae_that_asks_for_it_decodes_in_float32(tiny_sdxl, tiny_model):
    sdxl, sd = load_pipeline(tiny_sdxl), load_pipeline(tiny_model)
    assert sdxl.vae.config.force_upcast and sd.vae.config.force_upcast  # diffusers' default for both
    assert vae_dtype(sdxl, torch.float16) == torch.float32
    assert vae_dtype(sdxl, torch.bfloat16) == torch.bfloat16
    assert vae_dtype(sd, torch.float16) == torch.float16  # StableDiffusionPipeline never upcasts


def test_a_pipeline_of_another_kind_is_refused_by_name(tmp_path):
    folder = tmp_path / "other"
    folder.mkdir()
    (folder / "model_index.json").write_text('{"_class_name": "FluxPipeline", "_diffusers_version": "0.42.1"}')
    with pytest.raises(ValueError, match="is a FluxPipeline; pxpo trains StableDiffusionPipeline"):
        load_pipeline(str(folder))
    with pytest.raises(SystemExit, match="is a FluxPipeline"):
        cli.train_main(["--model", str(folder), "--output-dir", str(tmp_path / "run")])
