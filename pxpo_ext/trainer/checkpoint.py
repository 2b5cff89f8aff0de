"""Training checkpoints, written atomically, read back for an exact resume.

A checkpoint folder holds::

    trainable.safetensors   the trained parameters by name (LoRA adapters or the full UNet)
    optimizer.pt            AdamW state
    lr_scheduler.pt         learning-rate schedule state
    stat_tracker.pt         the per-prompt reward buffers (SPEC §4)
    trainer_state.json      epoch, global step, samples seen, the run's config
    rng_state_<rank>.pt     every random stream of each process (python, numpy, torch, sampler, prompts)

Every process calls :func:`save_checkpoint` (each writes its own RNG file; a save from the
main process only would leave the others waiting). Files go to a temporary sibling folder,
are fsynced, and the folder is renamed into place, so a crash never leaves a half-written
checkpoint under the final name.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

STATE_FILE = "trainer_state.json"
WEIGHTS_FILE = "trainable.safetensors"
_NAME = re.compile(r"^checkpoint-(\d+)$")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def capture_rng(extra: dict | None = None) -> dict:
    """Every global random stream of this process, plus ``extra`` named states."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    state.update(extra or {})
    return state


def restore_rng(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(folder, accelerator, *, trainable: dict[str, torch.Tensor], optimizer: dict, lr_scheduler: dict,
                    stat_tracker: dict, trainer_state: dict, rng_state: dict, write_extra=None) -> Path:
    """Write a checkpoint to ``folder`` atomically; call it on every process.

    ``write_extra(tmp_folder)`` (main process only) may add files, e.g. the diffusers LoRA.
    """
    folder = Path(folder)
    tmp = folder.with_name(f".{folder.name}.tmp")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    written = [tmp / f"rng_state_{accelerator.process_index}.pt"]
    torch.save(rng_state, written[0])
    if accelerator.is_main_process:
        save_file({k: v.detach().cpu().contiguous() for k, v in trainable.items()}, tmp / WEIGHTS_FILE)
        torch.save(optimizer, tmp / "optimizer.pt")
        torch.save(lr_scheduler, tmp / "lr_scheduler.pt")
        torch.save(stat_tracker, tmp / "stat_tracker.pt")
        (tmp / STATE_FILE).write_text(json.dumps(trainer_state, indent=1, default=str))
        if write_extra is not None:
            write_extra(tmp)
    for path in written:
        _fsync(path)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        for path in tmp.iterdir():
            _fsync(path)
        old = folder.with_name(f".{folder.name}.old")
        if folder.exists():  # re-saving the same epoch: swap, then drop the old copy
            shutil.rmtree(old, ignore_errors=True)
            folder.rename(old)
        tmp.rename(folder)
        _fsync(folder.parent)
        shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return folder


def load_checkpoint(folder, process_index: int = 0) -> dict:
    """Everything :func:`save_checkpoint` wrote, for this process."""
    folder = resolve(folder)
    rng_path = folder / f"rng_state_{process_index}.pt"
    if not rng_path.is_file():
        raise FileNotFoundError(f"{rng_path} is missing: the checkpoint was written by fewer processes than "
                                f"this run has; resume with the same number of processes")
    # Our own files (they hold numpy and python RNG states, which weights_only refuses).
    load = lambda name: torch.load(folder / name, map_location="cpu", weights_only=False)
    return {
        "trainable": load_file(folder / WEIGHTS_FILE),
        "optimizer": load("optimizer.pt"),
        "lr_scheduler": load("lr_scheduler.pt"),
        "stat_tracker": load("stat_tracker.pt"),
        "trainer_state": json.loads((folder / STATE_FILE).read_text()),
        "rng_state": torch.load(rng_path, map_location="cpu", weights_only=False),
    }


def list_checkpoints(run_dir) -> list[Path]:
    """Complete checkpoints under ``run_dir/checkpoints``, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _NAME.match(p.name)) and (p / STATE_FILE).is_file()]
    return [p for _, p in sorted(found)]


def resolve(path) -> Path:
    """A checkpoint folder itself, or the latest checkpoint of a run folder."""
    path = Path(path)
    if (path / STATE_FILE).is_file():
        return path
    found = list_checkpoints(path)
    if not found:
        raise FileNotFoundError(f"{str(path)!r} is neither a checkpoint (no {STATE_FILE}) nor a run folder with "
                                "checkpoints/checkpoint-<epoch>; pass one of those to resume_from")
    return found[-1]


def prune(run_dir, limit: int) -> None:
    """Keep the ``limit`` newest checkpoints (0 keeps all)."""
    if limit > 0:
        for old in list_checkpoints(run_dir)[:-limit]:
            shutil.rmtree(old, ignore_errors=True)
