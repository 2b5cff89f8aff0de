"""Rewards chosen by name on ``train.py``'s command line train one epoch on a tiny model.

One of each output kind: per-pixel maps from a segmentation model and one scalar per image
(the default ``colour`` runs in tests/test_cli.py, maps with weights from a person's marks in
tests/test_feedback.py).
"""
import json

import numpy as np
import pytest

REWARD_OPTIONS = {"remove_circles": {}, "scalar": {"function": "test_rewards:mean_brightness"}}


@pytest.mark.parametrize("name", ["remove_circles", "scalar"])
def test_train_py_trains_one_epoch_with_a_reward_of_each_kind(tiny_model, tmp_path, name):  # noqa: F811
    from pxpo_ext import cli

    run = tmp_path / "run"
    trainer = cli.train_main([
        "--model", tiny_model, "--output-dir", str(run), "--num-epochs", "1", "--sample-num-steps", "2",
        "--sample-batch-size", "2", "--sample-num-batches-per-epoch", "1", "--train-batch-size", "2",
        "--prompts", "text:a red circle", "--num-eval-images", "0", "--log-images-every", "0", "--save-freq", "0",
        "--reward-workers", "1", "--no-use-tensorboard", "--reward", name,
        "--reward-kwargs", json.dumps(REWARD_OPTIONS[name]), "--train-gradient-accumulation-steps", "1",
    ])
    expected_name = REWARD_OPTIONS[name]["function"] if name == "scalar" else name
    assert trainer.epoch == 1 and trainer.reward_name == expected_name
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and np.isfinite(rows[0]["reward_mean"]) and rows[0]["images_without_feedback"] == 0
    assert (run / "lora" / "pytorch_lora_weights.safetensors").is_file()
