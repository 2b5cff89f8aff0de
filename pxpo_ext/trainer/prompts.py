"""Prompt sources: ``prompt_fn() -> (prompt, metadata)`` callables chosen by name.

``get_prompt_fn(name, seed)`` accepts:

- ``"scenes"``: captions of the procedural scenes the embedded model was trained on;
- ``"animals"``: DDPO's kind of simple animal prompts;
- ``"text:<prompt>"``: always the same prompt;
- ``"file:<path>"``: one prompt per non-empty line of a text file.

Choices come from a private ``random.Random(seed)``, so a source is reproducible and its
state can be checkpointed (``state_dict`` / ``load_state_dict``).
"""
from __future__ import annotations

import random
from pathlib import Path

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


def _scene_prompts() -> list[str]:
    from ..scenes import prompts  # lazy: only the scenes source needs it

    return prompts(max_objects=1)


def get_prompt_fn(name: str, seed: int = 0) -> PromptSource:
    """The prompt source ``name`` (see the module docstring), seeded with ``seed``."""
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
    raise ValueError(f"unknown prompt source {name!r}: use 'scenes', 'animals', 'text:<prompt>' or 'file:<path>'")
