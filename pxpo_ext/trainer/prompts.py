"""Prompt sources: ``prompt_fn() -> (prompt, metadata)`` callables chosen by name.

``get_prompt_fn(name, seed)`` accepts:

- ``"scenes"``: captions of the procedural scenes the embedded model was trained on;
- ``"animals"``: DDPO's kind of simple animal prompts;
- ``"text:<prompt>"``: always the same prompt;
- ``"file:<path>"``: one prompt per non-empty line of a text file;
- ``"cycle:<n>:<source>"``: ``n`` prompts drawn once from ``source``, then walked in order over
  and over, each slot from its own fixed initial noise (:class:`CyclingPrompts`): with ``n`` the
  samples per epoch, every epoch rewards the same prompts from the same starting points, so the
  epoch's mean reward is comparable from epoch to epoch.
- ``"path/to/file.py:name"`` or ``"package.module:name"``: your own, imported: a list of prompts
  (drawn uniformly), a ``prompt_fn`` that takes no arguments, or a factory called with
  ``seed=`` that returns one.

Choices come from a private ``random.Random(seed)``, so a source is reproducible and its
state can be checkpointed (``state_dict`` / ``load_state_dict``).
"""
from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

from ..user_code import FORMS, UserCodeError, accepts, display_name, import_object, is_import_path

CYCLE_NOISE_STRIDE = 1_000_000  # slot seeds of different run seeds never meet

ANIMALS = (
    "cat", "dog", "horse", "monkey", "rabbit", "zebra", "spider", "bird", "sheep", "deer", "cow", "goat",
    "lion", "tiger", "bear", "raccoon", "fox", "wolf", "lizard", "beetle", "ant", "butterfly", "fish",
    "shark", "whale", "dolphin", "squirrel", "mouse", "rat", "snake", "turtle", "frog", "chicken", "duck",
    "goose", "bee", "pig", "turkey", "fly", "llama", "camel", "bat", "gorilla", "hedgehog", "kangaroo",
)


class PromptSource:
    """Draws prompts uniformly from a fixed list; metadata is empty."""

    def __init__(self, prompts: list[str], seed: int = 0, name: str = "prompts"):
        if not prompts:
            raise ValueError(f"prompt source {name!r} has no prompts")
        self.prompts = list(prompts)
        self.name = name
        self.rng = random.Random(seed)

    def __call__(self) -> tuple[str, dict]:
        return self.rng.choice(self.prompts), {}

    def state_dict(self) -> dict:
        return {"rng": self.rng.getstate()}

    def load_state_dict(self, state: dict) -> None:
        version, internal, gauss = state["rng"]
        self.rng.setstate((version, tuple(internal), gauss))


class CyclingPrompts:
    """``prompt_fn`` that returns ``prompts`` in order, over and over, each slot with its own fixed noise.

    With as many prompts as samples per epoch, every epoch rewards the same prompts from the same
    initial noise (``metadata["seed"] = noise_seed + slot``), so a change in the epoch's mean reward
    is the policy's doing, not a new draw of prompts or starting points; on the embedded model
    those alone move a 16-image mean of the colour reward by several hundredths. ``noise_seed=None``
    leaves the initial noise to the trainer's generator. ``metadata``: one dict per prompt, returned
    with it (the slot's seed added).
    """

    def __init__(self, prompts: list[str], noise_seed: int | None = None, metadata: list[dict] | None = None):
        if not prompts:
            raise ValueError("CyclingPrompts needs at least one prompt")
        if metadata is not None and len(metadata) != len(prompts):
            raise ValueError(f"CyclingPrompts got {len(metadata)} metadata dicts for {len(prompts)} prompts")
        self.prompts = list(prompts)
        self.metadata = [dict(m) for m in metadata] if metadata is not None else [{} for _ in self.prompts]
        self.noise_seed = noise_seed
        self.index = 0

    def __call__(self) -> tuple[str, dict]:
        slot = self.index % len(self.prompts)
        self.index += 1
        seed = {} if self.noise_seed is None else {"seed": self.noise_seed + slot}
        return self.prompts[slot], {**self.metadata[slot], **seed}

    def state_dict(self) -> dict:
        return {"index": self.index}

    def load_state_dict(self, state: dict) -> None:
        self.index = int(state["index"])


def _scene_prompts() -> list[str]:
    from ..scenes import prompts  # lazy: only the scenes source needs it

    return prompts(max_objects=1)


def get_prompt_fn(name: str, seed: int = 0) -> Callable[[], tuple[str, dict]]:
    """The prompt source ``name`` (see the module docstring), seeded with ``seed``: a ``PromptSource``, a
    ``CyclingPrompts`` or, for an import path, the user's own ``prompt_fn``."""
    if name.startswith("cycle:"):
        count, _, inner = name[len("cycle:"):].partition(":")
        if not count.isdigit() or int(count) < 1 or not inner:
            raise ValueError(f"prompt source {name!r}: write 'cycle:<count>:<source>', e.g. 'cycle:16:scenes'")
        source = get_prompt_fn(inner, seed)
        drawn = [checked_prompt(source(), source) for _ in range(int(count))]  # metadata kept: rewards may use it
        return CyclingPrompts([p for p, _ in drawn], noise_seed=CYCLE_NOISE_STRIDE * (seed + 1),
                              metadata=[m for _, m in drawn])
    if name == "scenes":
        return PromptSource(_scene_prompts(), seed, name)
    if name == "animals":
        return PromptSource([f"a photo of a {a}" for a in ANIMALS], seed, name)
    if name.startswith("text:"):
        text = name[len("text:"):].strip()
        if not text:
            raise ValueError("prompt source 'text:' needs a prompt after the colon, e.g. 'text:a red circle'")
        return PromptSource([text], seed, name)
    if name.startswith("file:"):
        path = Path(name[len("file:"):]).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"prompt file {str(path)!r} does not exist (prompt source {name!r})")
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        return PromptSource(lines, seed, name)
    if is_import_path(name):
        return _imported_prompts(name, seed)
    raise ValueError(f"unknown prompt source {name!r}: use 'scenes', 'animals', 'text:<prompt>', 'file:<path>', "
                     f"'cycle:<count>:<source>', or your own as {FORMS}")


def _imported_prompts(name: str, seed: int):
    what = f"prompt source {name!r}"
    target = import_object(name, what)
    if isinstance(target, (list, tuple)):
        if not all(isinstance(p, str) for p in target):
            raise UserCodeError(f"{what} is a {type(target).__name__} with items that are not strings")
        return PromptSource(list(target), seed, name)
    if callable(target) and accepts(target, seed=seed):  # a factory: seeded per process, as the built-in sources
        made = target(seed=seed)
        if not callable(made):
            raise UserCodeError(f"{what} returned a {type(made).__name__} when called with seed={seed}; "
                                "a factory must return a prompt function prompt_fn() -> (prompt, metadata)")
        return made
    if callable(target) and accepts(target):
        return target
    raise UserCodeError(f"{what} is a {type(target).__name__}: name a list of prompts, a prompt function "
                        "prompt_fn() -> (prompt, metadata), or a factory called with seed= that returns one")


def checked_prompt(item, prompt_fn) -> tuple[str, dict]:
    """One ``prompt_fn()`` result as ``(prompt, metadata)``; a bare string is a prompt without metadata."""
    if isinstance(item, str):
        return item, {}
    if (isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str)
            and isinstance(item[1], dict | None)):
        return item[0], dict(item[1] or {})
    raise TypeError(f"prompt function {display_name(prompt_fn)!r} returned {item!r:.100}; return (prompt, metadata): "
                    "a string and a dict (or None), or a bare string")
