"""The shipped tiny-shapes pipeline: a standard offline diffusers folder whose samples follow their prompts."""
import json

import pytest
import torch

from pxpo_ext import embedded
from pxpo_ext.embedded import pretrain
from pxpo_ext.judge import fidelity, judge_batch, segment_colours
from pxpo_ext.scenes import prompts

PATH = embedded.pipeline_path()
needs_weights = pytest.mark.skipif(not (PATH / "model_index.json").exists(),
                                   reason="the embedded pipeline has not been trained (python python/pretrain_tiny.py)")


@pytest.fixture(scope="module")
def pipe():
    return embedded.load_pipeline()


@needs_weights
def test_folder_is_a_small_standard_pipeline():
    index = json.loads((PATH / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    for part in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (PATH / part).is_dir() and part in index
    size = sum(f.stat().st_size for f in PATH.rglob("*.safetensors"))
    assert size <= 25e6, f"{size / 1e6:.1f} MB of safetensors"
    scheduler = json.loads((PATH / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["_class_name"] == "DDIMScheduler" and scheduler["set_alpha_to_one"] is False


@needs_weights
def test_loads_offline_with_plain_diffusers(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from diffusers import StableDiffusionPipeline

    plain = StableDiffusionPipeline.from_pretrained(PATH, local_files_only=True)
    vae_factor = 2 ** (len(plain.vae.config.block_out_channels) - 1)
    assert vae_factor == embedded.VAE_FACTOR in (4, 8)
    assert plain.unet.config.sample_size == embedded.LATENT_SIZE >= 16
    ids = plain.tokenizer("a red circle and a blue square on a yellow background").input_ids
    assert len(ids) == 13, "each caption word must be one token (plus start and end)"


@pytest.fixture(scope="module")
def samples(pipe):
    captions = prompts(32, seed=4321)
    with torch.no_grad():
        images = pipe(captions, num_inference_steps=embedded.NUM_INFERENCE_STEPS, guidance_scale=embedded.GUIDANCE_SCALE,
                      output_type="pt", generator=torch.Generator().manual_seed(0)).images
    return images, captions


@needs_weights
def test_samples_are_clean_flat_colour_images(samples):
    images, _ = samples
    assert images.shape == (32, 3, embedded.IMAGE_SIZE, embedded.IMAGE_SIZE) and torch.isfinite(images).all()
    on_palette = [float((segment_colours(image) >= 0).mean()) for image in images]
    # measured: each of the 32 samples has 97.8% or more of its pixels near a palette colour
    assert min(on_palette) >= 0.8, on_palette


@needs_weights
def test_sample_backgrounds_follow_their_prompts(samples):
    images, captions = samples
    rates = fidelity(judge_batch(images, captions))
    # The target (200 judged samples gave 99.5%, docs/embedded_model.md; these 32 gave 100%).
    assert rates["background"] >= 0.9, rates


@needs_weights
def test_sample_objects_follow_their_prompts(samples):
    images, captions = samples
    rates = fidelity(judge_batch(images, captions))
    # The target: 91.7% of 312 named objects in 200 judged samples (docs/embedded_model.md);
    # these 32 captions name 51 objects and 45 (88.2%) were found, 41 are needed.
    assert rates["objects"] >= 0.8, rates


def test_missing_weights_name_the_training_command(tmp_path):
    with pytest.raises(FileNotFoundError, match="pretrain_tiny.py"):
        embedded.load_pipeline(path=tmp_path)


def test_quick_training_writes_a_loadable_pipeline(tmp_path):
    pretrain.main(["--quick", "--out", str(tmp_path), "--threads", "1"])
    quick = embedded.load_pipeline(path=tmp_path)
    with torch.no_grad():
        out = quick(["a red circle on a blue background"], num_inference_steps=2, output_type="pt").images
    assert out.shape == (1, 3, embedded.IMAGE_SIZE, embedded.IMAGE_SIZE) and torch.isfinite(out).all()
    result = pretrain.evaluate(str(tmp_path), n=2, guidance=5.0, steps=2, seed=0, grid=None, threads=1)
    for judged in (result["fidelity"], result["vae_reconstruction_fidelity"], result["renoised_0.3_fidelity"]):
        assert judged["n"] == 2 and all(0.0 <= judged[k] <= 1.0 for k in ("background", "objects", "all"))
        assert judged["objects_by_outcome"]["found"] == judged["objects"]
        assert sum(judged["objects_by_outcome"].values()) == pytest.approx(1.0)
    assert result["steps"] == 2 and result["sample_8x20_s"] > 0


def test_training_can_judge_its_samples_at_every_save(tmp_path):
    pretrain.main(["--quick", "--out", str(tmp_path), "--threads", "1", "--device", "cpu", "--save-every", "1",
                   "--judge-every-save", "2"])
    curve = json.loads((tmp_path / "training.json").read_text())["judged"]
    assert [point["unet_step"] for point in curve] == [1, 2, 3]  # two saves inside the stage, one after it
    assert all(point["n"] == 2 and 0 <= point["objects"] <= 1 and point["seconds"] > 0 for point in curve)
    with pytest.raises(SystemExit):  # nothing would be saved, so nothing judged
        pretrain.main(["--quick", "--out", str(tmp_path / "x"), "--judge-every-save", "2"])


def test_vae_from_keeps_that_vae_and_records_where_it_came_from(tmp_path):
    from safetensors.torch import load_file

    base, new = tmp_path / "base", tmp_path / "new"
    pretrain.main(["--quick", "--out", str(base), "--threads", "1", "--device", "cpu"])
    pretrain.main(["--quick", "--out", str(new), "--threads", "1", "--device", "cpu", "--vae-from", str(base),
                   "--decoder-steps", "0"])
    name = "vae/diffusion_pytorch_model.safetensors"
    before, after = load_file(base / name), load_file(new / name)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    report = json.loads((new / "training.json").read_text())
    assert report["vae_from"] == str(base) and report["vae_loss"] is None
    assert report["vae_steps"] is None and report["batches"]["vae"] is None  # no VAE trained in this run
    assert report["vae_previous"] == json.loads((base / "training.json").read_text())


def test_finetune_decoder_keeps_the_encoder_and_appends_its_record(tmp_path):
    from safetensors.torch import load_file

    pretrain.main(["--quick", "--out", str(tmp_path), "--threads", "1", "--device", "cpu"])
    name = tmp_path / "vae" / "diffusion_pytorch_model.safetensors"
    before, record_before = load_file(name), json.loads((tmp_path / "training.json").read_text())
    for _ in range(2):
        pretrain.main(["--quick", "--finetune-decoder", "--out", str(tmp_path), "--threads", "1", "--device", "cpu",
                       "--decoder-steps", "2", "--lr", "1e-4"])
    after, report = load_file(name), json.loads((tmp_path / "training.json").read_text())
    encoder = [k for k in before if k.startswith(("encoder.", "quant_conv."))]
    assert encoder and all(torch.equal(before[k], after[k]) for k in encoder)  # the latent space is kept
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("decoder."))
    runs = report.pop("decoder_finetunes")
    assert report == record_before  # the folder's own record is kept as it was
    assert len(runs) == 2 and all(r["decoder"]["steps_done"] == 2 and r["lr"] == 1e-4 for r in runs)
    assert "--finetune-decoder" in runs[0]["command"] and runs[0]["device"] == "cpu"
    embedded.load_pipeline(path=tmp_path)


def test_budgeted_quick_training_records_its_stages(tmp_path):
    pretrain.main(["--quick", "--out", str(tmp_path), "--threads", "1", "--max-minutes", "0.5",
                        "--offset-noise", "0.2", "--object-weight", "3", "--snr-gamma", "0", "--device", "cpu"])
    report = json.loads((tmp_path / "training.json").read_text())
    assert report["device"] == "cpu" and report["offset_noise"] == 0.2 and report["max_minutes"] == 0.5
    assert report["object_weight"] == 3 and report["snr_gamma"] == 0
    for stage in ("vae", "unet", "decoder"):
        assert 1 <= report["stages"][stage]["steps_done"] <= report["stages"][stage]["steps_planned"]
    assert report["total_s"] < 30
    embedded.load_pipeline(path=tmp_path)


def test_budget_clock_stops_at_its_deadline_and_anneals():
    import time

    clock = pretrain.Clock(1000, deadline=time.time() - 1)
    assert list(clock) == [0] and clock.done == 1 and clock.stopped_by == "budget"  # one step at least
    clock = pretrain.Clock(10, stop=4)
    assert list(clock) == [0, 1, 2, 3] and clock.stopped_by == "stop"
    assert pretrain.lr_at(500, 1000, 1.0, 10, time_fraction=1.0) == pytest.approx(0.1)
    assert pretrain.lr_at(500, 1000, 1.0, 10) == pretrain.lr_at(500, 1000, 1.0, 10, time_fraction=0.0)
    budget = pretrain.Budget(1.0, (0.25, 0.6, 0.15), start=time.time())
    first = budget.deadline("vae") - time.time()
    assert 0.25 * (60 - budget.reserve_s) - 1 < first <= 0.25 * (60 - budget.reserve_s)
    assert pretrain.Budget(None, (1, 1, 1), start=0).deadline("unet") is None


def test_scenes_are_the_same_in_parallel():
    from pxpo_ext.scenes import SceneGenerator

    images, captions, objects = pretrain.make_scenes(2000, seed=3, workers=2, objects=True)
    reference = SceneGenerator(image_size=embedded.IMAGE_SIZE, seed=3)
    for i in (0, 777, 1999):
        scene = reference.sample(i)
        assert torch.equal(images[i], scene.image) and captions[i] == scene.caption
        assert torch.equal(objects[i], scene.label_map() > 0)


def test_init_from_continues_a_saved_pipeline(tmp_path):
    from safetensors.torch import load_file

    base, cont = tmp_path / "base", tmp_path / "cont"
    pretrain.main(["--quick", "--out", str(base), "--threads", "1", "--device", "cpu"])
    pretrain.main(["--quick", "--init-from", str(base), "--out", str(cont), "--threads", "1", "--device", "cpu",
                        "--unet-stop", "1", "--lr", "1e-4", "--max-minutes", "0.5", "--budget-shares", "0,0.8,0.2"])
    report = json.loads((cont / "training.json").read_text())
    previous = json.loads((base / "training.json").read_text())
    assert report["init_from"] == str(base) and report["previous"] == previous
    assert set(report["stages"]) == {"unet", "decoder"} and report["vae_loss"] is None  # no VAE stage
    assert report["scaling_factor"] == previous["scaling_factor"]  # kept, not recomputed
    assert report["unet_steps_total"] == previous["stages"]["unet"]["steps_done"] + 1
    name = "diffusion_pytorch_model.safetensors"
    before, after = load_file(base / "unet" / name), load_file(cont / "unet" / name)
    change = max((before[k] - after[k]).abs().max().item() for k in before)
    assert 0 < change < 1e-4, change  # one step at a small learning rate, from the saved weights
    vae_before, vae_after = load_file(base / "vae" / name), load_file(cont / "vae" / name)
    frozen = [k for k in vae_before if k.startswith(("encoder.", "quant_conv."))]  # the latent space is kept
    assert frozen and all(torch.equal(vae_before[k], vae_after[k]) for k in frozen)
    embedded.load_pipeline(path=cont)
    with pytest.raises(SystemExit):  # a --quick folder does not fit the full-size models
        pretrain.main(["--init-from", str(base), "--out", str(tmp_path / "bad"), "--scenes", "64",
                            "--threads", "1", "--device", "cpu"])
    assert not (tmp_path / "bad").exists()


def test_the_wide_unet_fits_the_package_and_the_small_one_is_told_apart_from_it(tmp_path):
    tokenizer = pretrain.build_tokenizer(tmp_path / "tok")
    text_encoder, vae, unet = pretrain.build_models(len(tokenizer), tokenizer, quick=False, unet_size="wide")
    assert tuple(unet.config.block_out_channels) == pretrain.UNET_CHANNELS["wide"]
    megabytes = sum(p.numel() * 4 for m in (text_encoder, vae, unet) for p in m.parameters()) / 1e6
    assert megabytes <= 25, megabytes  # float32 safetensors, the limit for the whole pipeline
    shipped = embedded.pipeline_path()
    pretrain.load_models(shipped, tokenizer, quick=False, unet_size="wide")  # the shipped model is the wide one
    with pytest.raises(ValueError, match=r"(?s)--unet-size small.*unet\.block_out_channels"):
        pretrain.load_models(shipped, tokenizer, quick=False, unet_size="small")


def test_object_weights_reweight_the_unet_loss_and_uniform_ones_change_nothing(tmp_path):
    tokenizer = pretrain.build_tokenizer(tmp_path / "tok")
    ids = tokenizer(["a red circle on a blue background"] * 4, padding="max_length", max_length=embedded.TEXT_LENGTH,
                    return_tensors="pt").input_ids
    empty = tokenizer([""], padding="max_length", max_length=embedded.TEXT_LENGTH, return_tensors="pt").input_ids[0]
    means, stds = torch.randn(4, 4, 16, 16), torch.full((4, 4, 16, 16), 0.1)

    def one_step(pixel_weights):
        torch.manual_seed(0)
        text_encoder, _, unet = pretrain.build_models(len(tokenizer), tokenizer, quick=True)
        return pretrain.train_unet(unet, text_encoder, ids, empty, means, stds, 1, 4, 1e-3,
                                   torch.Generator().manual_seed(1), 0.9, pixel_weights=pixel_weights)

    plain = one_step(None)
    assert one_step(torch.full((4, 1, 16, 16), 2.5)) == pytest.approx(plain, rel=1e-5)
    corner = torch.ones(4, 1, 16, 16)
    corner[..., :4, :4] = 10.0
    assert one_step(corner) != pytest.approx(plain, rel=1e-3)


def test_decoder_steps_0_leaves_the_decoder_as_it_was(tmp_path):
    from safetensors.torch import load_file

    base, cont = tmp_path / "base", tmp_path / "cont"
    pretrain.main(["--quick", "--out", str(base), "--threads", "1", "--device", "cpu"])
    pretrain.main(["--quick", "--init-from", str(base), "--out", str(cont), "--threads", "1", "--device", "cpu",
                   "--decoder-steps", "0"])
    report = json.loads((cont / "training.json").read_text())
    assert set(report["stages"]) == {"unet"} and report["decoder_loss"] is None
    name = "diffusion_pytorch_model.safetensors"
    before, after = load_file(base / "vae" / name), load_file(cont / "vae" / name)
    assert all(torch.equal(before[k], after[k]) for k in before)  # the whole VAE, decoder included
    for bad in (["--decoder-steps", "-1"], ["--object-weight", "-2"], ["--snr-gamma", "-1"]):
        with pytest.raises(SystemExit):
            pretrain.main(["--quick", "--out", str(tmp_path / "bad"), *bad])
        assert not (tmp_path / "bad").exists()
