"""The segmentation adapter (plain modules, transformers' Segformer) and the shipped shape segmenter."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pxpo_ext.rewards import (
    RewardError,
    SegmentationReward,
    from_transformers,
    get_reward,
    normalize_output,
)
from pxpo_ext.rewards.segmenter import (
    CLASSES,
    WEIGHTS,
    ShapeSegmenter,
    load_segmenter,
    segmenter_metrics,
)
from pxpo_ext.scenes import SceneGenerator


class BlueIsClassOne(nn.Module):
    """Scores class 1 where the blue channel is high, at half resolution: a known segmentation."""

    def __init__(self, sharpness: float = 50.0):
        super().__init__()
        self.sharpness = nn.Parameter(torch.tensor(sharpness), requires_grad=False)

    def forward(self, x):
        blue = F.avg_pool2d(x[:, 2:3], 2)
        return torch.cat([torch.zeros_like(blue), self.sharpness * (blue - 0.5)], dim=1)


class ReturnsThis(nn.Module):
    def __init__(self, output):
        super().__init__()
        self.output = output

    def forward(self, x):
        return self.output(x) if callable(self.output) else self.output


def blue_square(size=16) -> torch.Tensor:
    image = torch.zeros(1, 3, size, size)
    image[:, 2, : size // 2, : size // 2] = 1.0
    return image


def test_reward_is_minus_probability_of_the_class_upsampled_to_the_image():
    images = torch.cat([blue_square(), torch.rand(1, 3, 16, 16)])
    model = BlueIsClassOne()
    reward = SegmentationReward(model, classes=[1])(images)
    assert reward.shape == (2, 16, 16) and reward.dtype == torch.float32
    expected = -F.interpolate(model(images), size=(16, 16), mode="bilinear", align_corners=False).softmax(1)[:, 1]
    torch.testing.assert_close(reward, expected)
    assert reward[0, :6, :6].max() < -0.99 and reward[0, 10:, 10:].min() > -0.01


def test_weights_signs_and_several_classes():
    images = blue_square()
    model = BlueIsClassOne()
    grow = SegmentationReward(model, classes=[1], weights=2.0)(images)
    torch.testing.assert_close(grow, -2.0 * SegmentationReward(model, classes=[1])(images))
    both = SegmentationReward(model, classes=[0, 1], weights=[1.0, 1.0])(images)
    torch.testing.assert_close(both, torch.ones(1, 16, 16))  # probabilities sum to one


def test_sigmoid_activation_scores_classes_independently():
    images = blue_square()
    reward = SegmentationReward(BlueIsClassOne(), classes=[0], activation="sigmoid")(images)
    torch.testing.assert_close(reward, torch.full((1, 16, 16), -0.5))  # class 0 scores are all zero


@pytest.mark.parametrize("wrap", [lambda s: {"out": s}, lambda s: {"logits": s}, lambda s: type("O", (), {"logits": s})()])
def test_model_outputs_in_dicts_or_objects(wrap):
    base = BlueIsClassOne()
    wrapped = ReturnsThis(lambda x: wrap(base(x)))
    images = blue_square()
    torch.testing.assert_close(SegmentationReward(wrapped, [1])(images), SegmentationReward(base, [1])(images))


def test_normalisation_and_resizing_reach_the_model():
    seen = {}

    def record(x):
        seen["x"] = x
        return torch.zeros(x.shape[0], 2, 4, 4)

    reward = SegmentationReward(ReturnsThis(record), [1], image_mean=[0.5, 0.5, 0.5], image_std=0.25,
                                input_size=(8, 8))
    reward(torch.ones(1, 3, 16, 16))
    assert seen["x"].shape == (1, 3, 8, 8)
    torch.testing.assert_close(seen["x"], torch.full((1, 3, 8, 8), 2.0))


def tiny_segformer(labels=("background", "hair")):
    from transformers import SegformerConfig, SegformerForSemanticSegmentation

    config = SegformerConfig(num_encoder_blocks=1, depths=[1], sr_ratios=[1], hidden_sizes=[8], patch_sizes=[3],
                             strides=[4], num_attention_heads=[1], mlp_ratios=[1], decoder_hidden_size=8,
                             num_labels=len(labels), id2label=dict(enumerate(labels)),
                             label2id={name: i for i, name in enumerate(labels)})
    return SegformerForSemanticSegmentation(config)


def test_segformer_from_a_config_with_label_names():
    model = tiny_segformer()
    reward = SegmentationReward(model, classes=["hair"], image_mean=[0.485, 0.456, 0.406],
                                image_std=[0.229, 0.224, 0.225])
    images = torch.rand(2, 3, 32, 32)
    r = reward(images, ["a portrait"] * 2, [{}, {}])
    assert r.shape == (2, 32, 32) and (r <= 0).all() and (r >= -1).all()
    out = normalize_output(r, reward.name, 2, (32, 32))
    assert out.reward.shape == (2, 32, 32)
    assert reward.classes == [1]


def test_segformer_folder_with_its_image_processor(tmp_path):
    from transformers import SegformerImageProcessor

    tiny_segformer().save_pretrained(tmp_path)
    SegformerImageProcessor(size={"height": 24, "width": 24}, image_mean=[0.1, 0.2, 0.3],
                            image_std=[0.5, 0.5, 0.5]).save_pretrained(tmp_path)
    reward = from_transformers(str(tmp_path), ["hair"])
    assert reward.input_size == (24, 24)
    torch.testing.assert_close(reward.mean.flatten(), torch.tensor([0.1, 0.2, 0.3]))
    assert reward(torch.rand(1, 3, 40, 40)).shape == (1, 40, 40)
    registered = get_reward("segmentation", model=str(tmp_path), classes=["hair"], weights=-0.5)
    assert registered.name == "segmentation" and registered.weights == [-0.5]


@pytest.mark.parametrize(
    "options, message",
    [
        ({"classes": ["tail"]}, "unknown class 'tail'; known labels: background, hair"),
        ({"classes": []}, "choose at least one class"),
        ({"classes": [-1]}, "class index -1 is negative"),
        ({"classes": [1], "weights": [1.0, 2.0]}, "one per class"),
        ({"classes": [1], "weights": float("nan")}, "finite"),
        ({"classes": [1], "activation": "relu"}, "activation must be"),
        ({"classes": [1], "image_std": [0.0, 1.0, 1.0]}, "image_std must be positive"),
        ({"classes": [1], "image_mean": [0.1, 0.2]}, "image_mean needs 1 or 3 values"),
    ],
)
def test_configuration_errors_name_the_reward(options, message):
    with pytest.raises(ValueError, match="'segmentation'") as error:
        SegmentationReward(tiny_segformer(), **options)
    assert message in str(error.value)


def test_registered_segmentation_needs_a_model_and_classes(tmp_path):
    with pytest.raises(ValueError, match="needs model="):
        get_reward("segmentation")
    with pytest.raises(ValueError, match="cannot load a semantic-segmentation model"):
        get_reward("segmentation", model=str(tmp_path / "missing"), classes=[1])


@pytest.mark.parametrize(
    "output, message",
    [
        (lambda x: torch.zeros(x.shape[0], 4, 4), "expected (1, K, h, w)"),
        (lambda x: torch.zeros(x.shape[0] + 1, 2, 4, 4), "expected (1, K, h, w)"),
        (lambda x: torch.zeros(x.shape[0], 1, 4, 4), "class 1 chosen but the model scores 1 classes"),
        (lambda x: torch.full((x.shape[0], 2, 4, 4), float("nan")), "NaN or infinite scores"),
        (lambda x: [x], "returned list"),
    ],
)
def test_bad_model_outputs_name_the_reward(output, message):
    reward = SegmentationReward(ReturnsThis(output), [1], name="hair_remover")
    with pytest.raises(RewardError, match="'hair_remover'") as error:
        reward(torch.rand(1, 3, 8, 8))
    assert message in str(error.value)


# ------------------------------------------------------------------ the shipped segmenter
needs_weights = pytest.mark.skipif(not WEIGHTS.is_file(), reason="run python/train_segmenter.py to ship the weights")


@needs_weights
def test_shipped_segmenter_is_small_and_records_its_accuracy():
    assert WEIGHTS.stat().st_size < 1_000_000
    metrics = segmenter_metrics()
    assert metrics["clean"]["circle"] > 0.8 and metrics["degraded"]["circle"] > 0.7


@needs_weights
def test_remove_circles_is_negative_on_circles_only():
    scenes = SceneGenerator(image_size=64, seed=424242, max_objects=1, two_tone=False).generate(40)
    masks = torch.stack([s.masks_by_shape()["circle"] for s in scenes.scenes])
    others = torch.stack([s.label_map() > 1 for s in scenes.scenes])
    assert masks.any() and others.any()
    reward = get_reward("remove_circles")(scenes.images, scenes.captions, [{}] * len(scenes))
    assert reward.shape == (40, 64, 64) and (reward <= 0).all() and (reward >= -1).all()
    assert reward[masks].mean() < -0.8
    assert reward[~masks].mean() > -0.05 and reward[others].mean() > -0.15


@needs_weights
def test_remove_circles_takes_any_image_size():
    scene = SceneGenerator(image_size=96, seed=7, max_objects=1).sample(0)
    reward = get_reward("remove_circles")(scene.image[None], [scene.caption], [{}])
    assert reward.shape == (1, 96, 96)


def test_shape_segmenter_shapes_and_size_check():
    model = ShapeSegmenter(width=8).eval()
    assert model(torch.rand(2, 3, 32, 48)).shape == (2, len(CLASSES), 32, 48)
    with pytest.raises(ValueError, match="multiples of 8"):
        model(torch.rand(1, 3, 30, 32))


def test_missing_weights_say_how_to_train_them(tmp_path):
    with pytest.raises(FileNotFoundError, match="train_segmenter.py"):
        load_segmenter(tmp_path / "none.safetensors")


def test_save_and_load_round_trip(tmp_path):
    from pxpo_ext.rewards.segmenter import save_segmenter

    model = ShapeSegmenter(width=8).eval()
    save_segmenter(model, tmp_path / "s.safetensors", {"clean": {"circle": 0.5}})
    loaded = load_segmenter(tmp_path / "s.safetensors")
    x = torch.rand(1, 3, 16, 16)
    torch.testing.assert_close(loaded(x), model(x))
    assert segmenter_metrics(tmp_path / "s.safetensors") == {"clean": {"circle": 0.5}}


def test_a_short_training_run_writes_weights_with_their_held_out_metrics(tmp_path, capsys):
    from pxpo_ext.rewards.segmenter import segmenter_metrics
    from pxpo_ext.rewards.segmenter.training import main

    out = tmp_path / "seg.safetensors"
    metrics = main(["--steps", "2", "--train-scenes", "16", "--eval-scenes", "8", "--width", "8", "--out", str(out)])
    assert segmenter_metrics(out)["train_steps"] == 2 and metrics["held_out_scenes"] == 8
    for split in ("clean", "degraded", "distorted"):
        assert set(metrics[split]) >= set(CLASSES[1:]) and all(0 <= v <= 1 for v in metrics[split].values())
    load_segmenter(out)
    assert f"wrote {out}" in capsys.readouterr().out
