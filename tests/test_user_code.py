"""Rewards and prompt sources named by import path: ``package.module:name`` or ``path/to/file.py:name``."""
import sys

import pytest
import torch

from pxpo_ext.rewards import (
    RewardError,
    UnknownRewardError,
    get_reward,
    normalize_output,
)
from pxpo_ext.trainer.prompts import PromptSource, checked_prompt, get_prompt_fn
from pxpo_ext.user_code import UserCodeError

USER_FILE = '''
import torch

RUNS = globals().get("RUNS", 0) + 1  # counts executions of this file in one module object

def less_red(images, prompts, metadata):
    """A per-pixel reward function: minus the red channel."""
    return -images[:, 0]

def make_less(channel=0, scale=1.0):
    """A factory: called with the reward options, returns the reward function."""
    def reward(images, prompts, metadata):
        return -scale * images[:, channel]
    return reward

class Brightness:
    """A class is a factory too: its instances are reward functions."""
    def __init__(self, weight_left_half=False):
        self.weight_left_half = weight_left_half
    def __call__(self, images, prompts, metadata):
        return images.mean(dim=1)

def needs_a_path(path):
    return less_red

def returns_a_number(scale=1.0):
    return scale

NOT_CALLABLE = 3

PROMPTS = ["a red circle", "a blue square"]

class Colours:
    """A prompt factory: seeded like the built-in sources; metadata reaches the reward function."""
    def __init__(self, seed):
        import random
        self.rng = random.Random(seed)
    def __call__(self):
        colour = self.rng.choice(["red", "blue"])
        return f"a {colour} circle", {"colour": colour}

def one_prompt():
    return "a yellow star", None

BAD_LIST = ["a red circle", 3]
'''


@pytest.fixture()
def user_file(tmp_path):
    path = tmp_path / "my_rewards.py"
    path.write_text(USER_FILE)
    return path


def images(batch=2, size=8):
    torch.manual_seed(0)
    return torch.rand(batch, 3, size, size)


def test_a_reward_function_in_a_file(user_file):
    fn = get_reward(f"{user_file}:less_red")
    x = images()
    torch.testing.assert_close(fn(x, ["a", "b"], [{}, {}]), -x[:, 0])
    # what the trainer does with it: a per-pixel map at image resolution
    out = normalize_output(fn(x, ["a", "b"], [{}, {}]), "less_red", 2, (8, 8))
    assert out.reward.shape == (2, 8, 8)


def test_a_factory_in_a_file_takes_the_reward_options(user_file):
    fn = get_reward(f"{user_file}:make_less", channel=2, scale=0.5)
    x = images()
    torch.testing.assert_close(fn(x, [""] * 2, [{}] * 2), -0.5 * x[:, 2])
    assert fn.name == f"{user_file}:make_less"  # what errors and logs call it
    brightness = get_reward(f"{user_file}:Brightness", weight_left_half=True)
    assert brightness.weight_left_half and brightness(x, [""] * 2, [{}] * 2).shape == (2, 8, 8)


def test_a_file_runs_once_however_often_it_is_named(user_file):
    first = get_reward(f"{user_file}:less_red")
    second = get_reward(f"{user_file}:make_less")
    assert sys.modules[first.__module__] is sys.modules[second.__module__]
    assert sys.modules[first.__module__].RUNS == 1


def test_a_reward_in_an_importable_module(user_file, monkeypatch):
    monkeypatch.syspath_prepend(str(user_file.parent))
    monkeypatch.delitem(sys.modules, "my_rewards", raising=False)
    fn = get_reward("my_rewards:make_less", channel=1)
    x = images()
    torch.testing.assert_close(fn(x, [""] * 2, [{}] * 2), -x[:, 1])


def test_the_scalar_reward_takes_a_file_too(tmp_path):
    path = tmp_path / "scores.py"
    path.write_text("def brightness(images, prompts, metadata):\n    return images.mean(dim=(1, 2, 3))\n")
    fn = get_reward("scalar", function=f"{path}:brightness")
    x = images()
    torch.testing.assert_close(fn(x, ["a", "b"], [{}, {}]), x.mean(dim=(1, 2, 3)))


@pytest.mark.parametrize(
    "target, options, error, message",
    [
        ("{dir}/missing.py:f", {}, UserCodeError, "file '{dir}/missing.py' does not exist"),
        ("{file}:no_such_name", {}, UserCodeError, "has no attribute 'no_such_name'"),
        ("{file}:NOT_CALLABLE", {}, UserCodeError, "is a int, not a reward function or a factory"),
        ("{file}:returns_a_number", {}, UserCodeError, "returned a float when called with no options"),
        ("{file}:less_red", {"scale": 2}, UserCodeError, "is a reward function and takes no options, got ['scale']"),
        ("{file}:needs_a_path", {}, UserCodeError, "takes neither (images, prompts, metadata) nor the options []"),
        ("{file}:make_less", {"colour": 1}, UserCodeError, "nor the options ['colour']"),
        ("no_such_module_xyz:f", {}, UserCodeError, "cannot import module 'no_such_module_xyz'"),
        ("{file}:not-a-name", {}, UserCodeError, "must look like 'package.module:name' or 'path/to/file.py:name'"),
        ("no-such-reward", {}, UnknownRewardError, "or your own as 'package.module:name'"),
    ],
)
def test_bad_import_paths_say_what_to_write(user_file, target, options, error, message):
    name = target.format(file=user_file, dir=user_file.parent)
    with pytest.raises(error) as raised:
        get_reward(name, **options)
    assert message.format(dir=user_file.parent) in str(raised.value)


def test_an_imported_reward_that_returns_a_bad_map_is_named_in_the_error(user_file):
    fn = get_reward(f"{user_file}:less_red")
    with pytest.raises(RewardError, match="less_red"):
        normalize_output(fn(images(size=4), [""] * 2, [{}] * 2), fn.name, 2, (8, 8))


# ------------------------------------------------------------------ prompt sources
def test_a_list_of_prompts_in_a_file_is_drawn_from_with_the_seed(user_file):
    source = get_prompt_fn(f"{user_file}:PROMPTS", seed=3)
    assert isinstance(source, PromptSource)
    again = get_prompt_fn(f"{user_file}:PROMPTS", seed=3)
    drawn = [source() for _ in range(8)]
    assert drawn == [again() for _ in range(8)] and {p for p, _ in drawn} <= {"a red circle", "a blue square"}


def test_a_prompt_factory_gets_the_seed_and_a_prompt_function_is_used_as_it_is(user_file):
    colours = get_prompt_fn(f"{user_file}:Colours", seed=5)
    prompt, metadata = colours()
    assert prompt == f"a {metadata['colour']} circle"
    assert get_prompt_fn(f"{user_file}:Colours", seed=5)() == (prompt, metadata)
    one = get_prompt_fn(f"{user_file}:one_prompt", seed=0)
    assert checked_prompt(one(), one) == ("a yellow star", {})


def test_cycling_over_your_own_prompts_keeps_their_metadata(user_file):
    cycle = get_prompt_fn(f"cycle:3:{user_file}:PROMPTS", seed=0)
    first = [cycle() for _ in range(3)]
    assert [cycle() for _ in range(3)] == first  # the same 3 prompts and noise seeds every lap
    colours = get_prompt_fn(f"cycle:4:{user_file}:Colours", seed=5)
    drawn = [colours() for _ in range(8)]
    for prompt, metadata in drawn:
        assert prompt == f"a {metadata['colour']} circle" and isinstance(metadata["seed"], int)
    assert drawn[:4] == drawn[4:]


@pytest.mark.parametrize(
    "target, message",
    [
        ("{file}:BAD_LIST", "is a list with items that are not strings"),
        ("{file}:NOT_CALLABLE", "is a int: name a list of prompts, a prompt function"),
        ("{file}:needs_a_path", "is a function: name a list of prompts"),  # takes neither seed= nor nothing
        ("{file}:no_such_name", "has no attribute 'no_such_name'"),
    ],
)
def test_bad_prompt_sources_say_what_to_write(user_file, target, message):
    with pytest.raises(UserCodeError) as raised:
        get_prompt_fn(target.format(file=user_file), seed=0)
    assert message in str(raised.value)


@pytest.mark.parametrize("item", ["a cat", ("a cat", {"k": 1}), ("a cat", None)])
def test_checked_prompt_takes_a_prompt_with_or_without_metadata(item):
    prompt, metadata = checked_prompt(item, None)
    assert prompt == "a cat" and isinstance(metadata, dict)


@pytest.mark.parametrize("item", [("a cat",), ("a cat", "meta"), 3, ["a cat", {}], None])
def test_checked_prompt_refuses_anything_else_naming_the_function(item):
    def my_prompts():
        return item

    with pytest.raises(TypeError, match="prompt function 'my_prompts' returned .*; return \\(prompt, metadata\\)"):
        checked_prompt(my_prompts(), my_prompts)


def test_a_file_that_fails_to_import_raises_its_own_error_and_is_not_cached(tmp_path):
    path = tmp_path / "broken.py"
    path.write_text("raise RuntimeError('my setup failed')\ndef r(images, prompts, metadata):\n    return images[:, 0]\n")
    with pytest.raises(RuntimeError, match="my setup failed"):  # the user's own traceback, not a wrapped one
        get_reward(f"{path}:r")
    path.write_text("def r(images, prompts, metadata):\n    return images[:, 0]\n")  # fixed: imported afresh
    assert get_reward(f"{path}:r")(images(), ["a", "b"], [{}, {}]).shape == (2, 8, 8)
