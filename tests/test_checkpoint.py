"""Checkpoints: atomic layout, pruning, and a resumed run that is bit-identical to an uninterrupted one."""
import json

import pytest
import torch
from accelerate import Accelerator
from safetensors.torch import load_file
from test_trainer import blue_reward, tiny_config

from pxpo_ext.trainer import PXPOTrainer, load_pipeline
from pxpo_ext.trainer import checkpoint as ckpt
from pxpo_ext.trainer.prompts import PromptSource


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)


def _run(model, out, **overrides) -> PXPOTrainer:
    # Two prompts, buffers that fill after one epoch, a cosine schedule, shuffling, accumulation:
    # every piece of state a resume must restore is in play.
    config = tiny_config(model, out, num_epochs=2, sample_num_batches_per_epoch=2, train_batch_size=2,
                         train_gradient_accumulation_steps=2, train_num_inner_epochs=2, per_prompt_stat_tracking=True,
                         stat_buffer_size=4, stat_min_count=2, train_lr_scheduler="cosine", train_lr_warmup_steps=1,
                         save_freq=1, num_checkpoint_limit=1, **overrides)
    return PXPOTrainer(config, blue_reward, PromptSource(["a red circle", "a blue star"], seed=5),
                       load_pipeline(model))


def _trained(trainer):
    named = dict(trainer._unwrapped_unet.named_parameters())
    return {n: named[n].detach().clone() for n in trainer.trainable_names}


@pytest.fixture(scope="module")
def runs(tiny_model, tmp_path_factory):
    """An uninterrupted 2-epoch run, and the same run stopped after epoch 1 and resumed in a new trainer."""
    root = tmp_path_factory.mktemp("runs")
    torch.set_num_threads(1)
    full = _run(tiny_model, root / "full")
    full_history = full.train()
    full.close()
    first = _run(tiny_model, root / "parts")
    first.train(epochs=1)
    first.close()
    resumed = _run(tiny_model, root / "parts", resume_from=str(root / "parts"))
    at_resume = (resumed.epoch, resumed.global_step, first.global_step)
    rest = resumed.train()
    resumed.close()
    return {"root": root, "full": full, "full_history": full_history, "resumed": resumed, "rest": rest, "at_resume": at_resume}


def test_resume_is_bit_identical_to_an_uninterrupted_run(runs):
    full, resumed, rest = runs["full"], runs["resumed"], runs["rest"]
    epoch, step, step_saved = runs["at_resume"]
    assert (epoch, step) == (1, step_saved) and step > 0
    assert [m["epoch"] for m in rest] == [1]
    assert (resumed.epoch, resumed.global_step, resumed.samples_seen) == (full.epoch, full.global_step,
                                                                          full.samples_seen)
    for key in ("reward_mean", "loss", "approx_kl", "lr"):
        assert [m[key] for m in rest] == [m[key] for m in runs["full_history"][1:]], key
    a, b = _trained(full), _trained(resumed)
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert torch.equal(full.generator.get_state(), resumed.generator.get_state())
    sa, sb = full.tracker.state_dict(), resumed.tracker.state_dict()
    assert sa["prompts"] == sb["prompts"] and all(torch.equal(x, y) for x, y in zip(sa["rewards"], sb["rewards"]))
    records = [json.loads(line) for line in (runs["root"] / "parts" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [0, 1]


def test_checkpoint_contents_and_pruning(runs):
    run, trainer = runs["root"] / "full", runs["full"]
    found = ckpt.list_checkpoints(run)
    assert [p.name for p in found] == ["checkpoint-2"]  # num_checkpoint_limit=1 removed checkpoint-1
    latest = found[-1]
    assert ckpt.resolve(run) == latest
    names = {p.name for p in latest.iterdir()}
    assert {"trainable.safetensors", "optimizer.pt", "lr_scheduler.pt", "stat_tracker.pt", "trainer_state.json",
            "rng_state_0.pt", "pytorch_lora_weights.safetensors"} <= names
    assert not list((run / "checkpoints").glob(".*"))  # no temporary or swapped-out folders left
    state = json.loads((latest / "trainer_state.json").read_text())
    assert (state["epoch"], state["global_step"]) == (2, trainer.global_step)
    weights = load_file(latest / "trainable.safetensors")
    assert set(weights) == set(trainer.trainable_names)
    assert all(w.dtype == torch.float32 for w in weights.values())


def test_resume_refuses_a_different_setup(tiny_model, runs, tmp_path):
    with pytest.raises(ValueError, match="algorithm"):
        _run(tiny_model, tmp_path / "other", algorithm="ddpo", resume_from=str(runs["root"] / "parts"))
    with pytest.raises(FileNotFoundError, match="resume_from"):
        ckpt.resolve(tmp_path / "nothing_here")


def test_resave_replaces_a_checkpoint_atomically(tmp_path):
    acc = Accelerator(cpu=True)
    args = {"optimizer": {}, "lr_scheduler": {}, "stat_tracker": {}, "rng_state": ckpt.capture_rng()}
    folder = tmp_path / "checkpoints" / "checkpoint-1"
    ckpt.save_checkpoint(folder, acc, trainable={"w": torch.zeros(2)}, trainer_state={"epoch": 1}, **args)
    ckpt.save_checkpoint(folder, acc, trainable={"w": torch.ones(2)}, trainer_state={"epoch": 1}, **args)
    assert torch.equal(load_file(folder / "trainable.safetensors")["w"], torch.ones(2))
    assert sorted(p.name for p in folder.parent.iterdir()) == ["checkpoint-1"]


def test_rng_state_round_trips_through_weights_only_files(tmp_path):
    """The numpy stream is stored as a tensor (loadable with weights_only=True); RNG files written before
    that, with a numpy array inside, still load (numpy arrays are allow-listed, nothing else)."""
    import random

    import numpy as np

    acc = Accelerator(cpu=True)
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    state = ckpt.capture_rng({"sampler": torch.Generator().manual_seed(4).get_state(), "prompts": None})
    expected = (random.random(), np.random.rand(), torch.rand(1))
    args = {"optimizer": {}, "lr_scheduler": {}, "stat_tracker": {}, "trainer_state": {"epoch": 1}}
    folder = ckpt.save_checkpoint(tmp_path / "checkpoints" / "checkpoint-1", acc, trainable={"w": torch.zeros(1)},
                                  rng_state=state, **args)
    torch.load(folder / "rng_state_0.pt", weights_only=True)  # plain tensors, numbers and strings
    ckpt.restore_rng(ckpt.load_checkpoint(folder)["rng_state"])
    assert (random.random(), np.random.rand(), torch.rand(1)) == expected

    np.random.seed(2)
    torch.save({**state, "numpy": np.random.get_state()}, folder / "rng_state_0.pt")  # the earlier format
    ckpt.restore_rng(ckpt.load_checkpoint(folder)["rng_state"])
    assert np.random.rand() == expected[1]
