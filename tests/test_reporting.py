"""RunReporter: the files a run leaves (metrics.jsonl, reward curve, sample grids, tensorboard) and plots."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from pxpo_ext import plots
from pxpo_ext.trainer.reporting import RunReporter


def epoch_metrics(epoch: int) -> dict:
    return {
        "epoch": epoch, "samples_seen": 4 * (epoch + 1), "reward_mean": torch.tensor(-0.5 + 0.1 * epoch),
        "reward_std": np.float32(0.05), "approx_kl": 1e-3, "clipfrac": 0.1, "seconds": 2.0, "loss": 0.25,
    }


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def png_size(path) -> tuple[int, int]:
    with Image.open(path) as im:
        im.load()  # fails on a truncated file
        return im.size


def test_epochs_append_well_formed_json_lines(tmp_path):
    reporter = RunReporter(tmp_path, use_tensorboard=False)
    for epoch in range(3):
        reporter.log_epoch(epoch_metrics(epoch))
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["epoch"] for r in rows] == [0, 1, 2]
    assert rows[2]["reward_mean"] == pytest.approx(-0.3)
    assert isinstance(rows[0]["reward_std"], float) and rows[0]["samples_seen"] == 4
    assert set(epoch_metrics(0)) <= set(rows[0])


def test_non_finite_values_are_written_as_null(tmp_path):
    reporter = RunReporter(tmp_path, use_tensorboard=False)
    reporter.log_epoch({"epoch": 0, "loss": float("nan"), "approx_kl": math.inf, "hist": torch.tensor([1.0, 2.0])})
    (row,) = read_jsonl(tmp_path / "metrics.jsonl")  # json.loads would accept NaN; the text must not hold it
    assert "NaN" not in (tmp_path / "metrics.jsonl").read_text()
    assert row == {"epoch": 0, "loss": None, "approx_kl": None, "hist": [1.0, 2.0]}


def test_an_epoch_needs_an_integer_epoch(tmp_path):
    with pytest.raises(ValueError, match="integer 'epoch'"):
        RunReporter(tmp_path, use_tensorboard=False).log_epoch({"reward_mean": 1.0})


def test_a_resumed_run_continues_and_replaces_epochs_logged_after_its_checkpoint(tmp_path):
    first = RunReporter(tmp_path, use_tensorboard=False)
    for epoch in range(4):
        first.log_epoch(epoch_metrics(epoch))
    first.close()
    resumed = RunReporter(tmp_path, use_tensorboard=False)  # e.g. resumed from the checkpoint after epoch 1
    assert len(resumed.records) == 4
    resumed.log_epoch({**epoch_metrics(2), "reward_mean": 9.0})
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["epoch"] for r in rows] == [0, 1, 2] and rows[-1]["reward_mean"] == 9.0


def test_a_corrupt_metrics_file_is_reported_with_its_line(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"epoch": 0}\n{"epoch": 1\n')
    with pytest.raises(ValueError, match="metrics.jsonl:2 is not valid JSON"):
        RunReporter(tmp_path, use_tensorboard=False)


def test_sample_grid_and_reward_curve_are_readable_pngs(tmp_path):
    reporter = RunReporter(tmp_path, use_tensorboard=False)
    images = torch.rand(3, 3, 32, 32)
    maps = torch.randn(3, 4, 4)  # latent resolution: stretched over the image
    path = reporter.log_samples("epoch 3/eval", images, ["a red circle", "b", "c"], reward_maps=maps, step=3)
    assert path == tmp_path / "samples_epoch_3_eval.png"
    width, height = png_size(path)
    assert width > 2 * height  # 3 images, each beside its heatmap: 2 columns of pairs, 2 rows
    assert reporter.plot_curves() is None  # nothing logged yet
    for epoch in range(3):
        reporter.log_epoch(epoch_metrics(epoch))
    assert png_size(reporter.plot_curves())[0] > 0
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["metrics.jsonl", "reward_curve.png", "samples_epoch_3_eval.png"]


def test_samples_without_reward_maps_and_with_scalar_rewards_and_weights(tmp_path):
    reporter = RunReporter(tmp_path, use_tensorboard=False)
    images = torch.rand(2, 3, 16, 16)
    plain = png_size(reporter.log_samples("plain", images, ["a", "b"]))
    paired = png_size(reporter.log_samples("scalar", images, ["a", "b"], reward_maps=torch.tensor([0.5, -1.0])))
    assert paired[0] > plain[0]
    weights = torch.zeros(2, 16, 16)
    weights[:, :8] = 1.0
    reporter.log_samples("weighted", images, ["a", "b"], reward_maps=torch.randn(2, 16, 16), weight_maps=weights)
    assert (tmp_path / "samples_weighted.png").is_file()


def test_sample_inputs_are_checked(tmp_path):
    reporter = RunReporter(tmp_path, use_tensorboard=False)
    with pytest.raises(ValueError, match="2 captions for 3 images"):
        reporter.log_samples("x", torch.rand(3, 3, 8, 8), ["a", "b"])
    with pytest.raises(ValueError, match="got 2 reward maps for 3 images"):
        reporter.log_samples("x", torch.rand(3, 3, 8, 8), ["a"] * 3, reward_maps=torch.rand(2, 8, 8))
    with pytest.raises(ValueError, match="shape"):
        reporter.log_samples("x", torch.rand(3, 8, 8), ["a"] * 3)
    with pytest.raises(ValueError, match="no usable characters"):
        reporter.log_samples("///", torch.rand(1, 3, 8, 8), ["a"])


def test_summary_names_epochs_samples_reward_change_and_files(tmp_path):
    reporter = RunReporter(tmp_path, use_tensorboard=False)
    assert "no epochs logged yet" in reporter.summary()
    for epoch in range(3):
        reporter.log_epoch(epoch_metrics(epoch))
    reporter.plot_curves()
    text = reporter.summary()
    assert "epochs: 3 (epoch 0 to 2), samples seen: 12" in text
    assert "reward mean: -0.5 -> -0.3" in text
    assert "time: 6.0 s" in text
    assert str(tmp_path) in text and "reward_curve.png" in text


def test_tensorboard_gets_scalars_and_images(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with RunReporter(tmp_path) as reporter:
        for epoch in range(2):
            reporter.log_epoch(epoch_metrics(epoch))
        reporter.log_samples("eval", torch.rand(2, 3, 16, 16), ["a", "b"], reward_maps=torch.randn(2, 16, 16), step=1)
    events = EventAccumulator(str(tmp_path / "tensorboard")).Reload()
    tags = events.Tags()
    assert {"reward_mean", "reward_std", "approx_kl", "clipfrac", "samples_seen", "loss"} <= set(tags["scalars"])
    assert [e.step for e in events.Scalars("reward_mean")] == [0, 1]
    assert tags["images"] == ["samples/eval"]
    assert "tensorboard --logdir" in reporter.summary()


def test_disabled_reporter_writes_nothing(tmp_path):
    run_dir = tmp_path / "run"
    reporter = RunReporter(run_dir, enabled=False)
    assert reporter.log_epoch(epoch_metrics(0)) == {}
    assert reporter.log_samples("x", torch.rand(1, 3, 8, 8), ["a"]) is None
    assert reporter.plot_curves() is None
    assert reporter.summary() == ""
    reporter.close()
    assert not run_dir.exists()


def test_atomic_write_replaces_whole_files_and_leaves_no_temporaries(tmp_path):
    target = tmp_path / "sub" / "file.txt"
    plots.atomic_write(target, "first")
    plots.atomic_write(target, b"second")
    assert target.read_bytes() == b"second"
    assert [p.name for p in target.parent.iterdir()] == ["file.txt"]


def test_images_to_hwc_accepts_tensors_uint8_and_lists():
    batch = plots.images_to_hwc(torch.rand(2, 3, 5, 7))
    assert len(batch) == 2 and batch[0].shape == (5, 7, 3)
    (u8,) = plots.images_to_hwc(np.full((1, 3, 2, 2), 255, dtype=np.uint8))
    assert np.allclose(u8, 1.0)
    (from_list,) = plots.images_to_hwc([np.zeros((4, 4, 3))])
    assert from_list.shape == (4, 4, 3)
