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
checkpoint under the final name; a write that fails (a full disk) removes its temporary folder
and says which checkpoint it could not write, and the previous checkpoints stay as they were.
The processes tell each other at every barrier whether they succeeded, so a write that fails on
one process makes all of them raise instead of leaving the others waiting.

Nothing is unpickled: the ``.pt`` files hold only tensors, numbers, strings and containers of
them (the numpy RNG state is stored as a tensor) and are read with ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from accelerate.utils import gather_object
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

STATE_FILE = "trainer_state.json"
WEIGHTS_FILE = "trainable.safetensors"
TORCH_FILES = ("optimizer.pt", "lr_scheduler.pt", "stat_tracker.pt")
_NAME = re.compile(r"^checkpoint-(\d+)$")
# A re-save of the same epoch moves the previous copy aside under this name before renaming the new
# one into place; a crash between the two renames leaves it as the only (and complete) copy.
_MOVED_ASIDE = re.compile(r"^\.checkpoint-(\d+)\.old$")
_TEMPORARY = re.compile(r"^\.checkpoint-(\d+)\.tmp$")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_WRITE_ERRORS = (OSError, SafetensorError)  # safetensors reports its I/O errors as "... (os error 28) ..."


def _write_error(error: Exception, what: str, where: Path) -> OSError:
    """``error`` as an ``OSError`` whose message names ``where`` and, for a full disk, says so."""
    code = getattr(error, "errno", None)
    if code is None and (m := re.search(r"os error (\d+)", str(error))):
        code = int(m.group(1))
    if code in (errno.ENOSPC, errno.EDQUOT):
        reason = "the disk is full (no space left on device)"
    else:
        reason = getattr(error, "strerror", None) or str(error)
    message = f"could not write {what} {str(where)!r}: {reason}; earlier checkpoints and weights are untouched"
    kind = type(error) if isinstance(error, OSError) else OSError
    return kind(code, message) if code is not None else kind(message)


def check_writable(folder) -> Path:
    """Check that ``folder`` can be created (or, if it exists, written to) without leaving anything behind.

    Raises an ``OSError`` that names the folder and the reason: a path component that is a file, no
    permission, a read-only file system.
    """
    folder = Path(folder)
    existing = folder
    while not existing.exists() and existing != existing.parent:  # the nearest folder that exists
        existing = existing.parent
    try:
        if not existing.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, f"{str(existing)!r} is a file")
        probe = existing / f".pxpo-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        reason = f"a file is in the way ({str(existing)!r} is not a folder)" if isinstance(
            error, NotADirectoryError) else (error.strerror or str(error))
        raise type(error)(error.errno, f"output_dir {str(folder)!r} cannot be written: {reason}; "
                                       "choose a folder you can write to") from error
    return folder


def capture_rng(extra: dict | None = None) -> dict:
    """Every global random stream of this process, plus ``extra`` named states (tensors, numbers, strings)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(),
             # numpy's key array as a tensor: the file stays loadable with ``weights_only=True``
             "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    state.update(extra or {})
    return state


def restore_rng(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    keys = keys.numpy() if isinstance(keys, torch.Tensor) else np.asarray(keys)
    np.random.set_state((kind, keys.astype(np.uint32), int(pos), int(has_gauss), float(cached)))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def raise_if_any_failed(accelerator, error: Exception | None, action: str) -> None:
    """A barrier at which every process learns whether any process failed to ``action`` (e.g. "save '<folder>'").

    The process that failed raises its ``error``; the others raise an error naming it and its message
    (an ``OSError`` with the same errno when it was one, so every process can handle it alike) instead of
    waiting forever at the next barrier for a process that has given up.
    """
    report = None if error is None else (isinstance(error, OSError), getattr(error, "errno", None),
                                         getattr(error, "strerror", None) or str(error))
    reports = gather_object([report]) if accelerator.num_processes > 1 else [report]
    if error is not None:
        raise error
    for rank, report in enumerate(reports):
        if report is not None:
            is_os_error, code, message = report
            who = "the main process" if rank == 0 else f"process {rank}"
            text = f"{who} failed to {action}: {message}; this process stops too"
            if not is_os_error:
                raise RuntimeError(text)
            raise OSError(code, text) if code is not None else OSError(text)


def on_main_process(accelerator, work, action: str) -> None:
    """``work()`` on the main process, then :func:`raise_if_any_failed` on every process."""
    error = None
    if accelerator.is_main_process:
        try:
            work()
        except Exception as caught:  # noqa: BLE001  (any failure must reach the other processes)
            error = caught
    raise_if_any_failed(accelerator, error, action)


def save_checkpoint(folder, accelerator, *, trainable: dict[str, torch.Tensor], optimizer: dict, lr_scheduler: dict,
                    stat_tracker: dict, trainer_state: dict, rng_state: dict, write_extra=None) -> Path:
    """Write a checkpoint to ``folder`` atomically; call it on every process.

    ``write_extra(tmp_folder)`` (main process only) may add files, e.g. the diffusers LoRA.
    An ``OSError`` (a full disk, no permission) removes the temporary folder and is raised again
    with a message naming ``folder``; earlier checkpoints are never touched. A failure on any process
    makes every process raise (see :func:`raise_if_any_failed`), none waits for the others forever.
    """
    folder = Path(folder)
    tmp = folder.with_name(f".{folder.name}.tmp")
    old = folder.with_name(f".{folder.name}.old")

    def prepare():
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)

    def write():
        rng_file = tmp / f"rng_state_{accelerator.process_index}.pt"
        torch.save(rng_state, rng_file)
        if accelerator.is_main_process:
            save_file({k: v.detach().cpu().contiguous() for k, v in trainable.items()}, tmp / WEIGHTS_FILE)
            torch.save(optimizer, tmp / "optimizer.pt")
            torch.save(lr_scheduler, tmp / "lr_scheduler.pt")
            torch.save(stat_tracker, tmp / "stat_tracker.pt")
            (tmp / STATE_FILE).write_text(json.dumps(trainer_state, indent=1, default=str))
            if write_extra is not None:
                write_extra(tmp)
        _fsync(rng_file)

    def publish():
        if accelerator.is_main_process:
            for path in tmp.iterdir():
                _fsync(path)
            _fsync(tmp)
            if folder.exists():  # re-saving the same epoch: swap, then drop the old copy
                shutil.rmtree(old, ignore_errors=True)
                folder.rename(old)
            tmp.rename(folder)
            _fsync(folder.parent)
            shutil.rmtree(old, ignore_errors=True)

    for step in (prepare, write, publish):  # every process finishes each step before any starts the next
        error = None
        try:
            step()
        except Exception as caught:  # noqa: BLE001  (any failure must reach the other processes)
            error = caught
            if isinstance(caught, _WRITE_ERRORS):
                error = _write_error(caught, "checkpoint", folder)
                error.__cause__ = caught
        try:
            raise_if_any_failed(accelerator, error, f"save checkpoint {str(folder)!r}")
        except Exception:
            if accelerator.is_main_process:
                shutil.rmtree(tmp, ignore_errors=True)
                if old.is_dir() and not folder.exists():  # failed between the two renames: put the old copy back
                    with contextlib.suppress(OSError):  # if even that fails, list_checkpoints still finds it
                        old.rename(folder)
            raise
    return folder


def _numpy_array_globals() -> list:
    """What ``weights_only`` needs to rebuild a plain numpy array: the RNG files of checkpoints written before
    the numpy state was stored as a tensor. Arrays only; no other callable is allowed."""
    core = getattr(np, "_core", None) or np.core
    return [core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def _load_torch(path: Path, folder: Path):
    try:
        with torch.serialization.safe_globals(_numpy_array_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"checkpoint {str(folder)!r} is incomplete: {path.name} is missing") from None
    except Exception as error:  # noqa: BLE001  (truncated zip, foreign pickle, anything weights_only refuses)
        raise ValueError(f"checkpoint {str(folder)!r}: {path.name} is corrupt or not a pxpo checkpoint file "
                         f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}); "
                         "resume from an earlier checkpoint") from None


def load_checkpoint(folder, process_index: int = 0) -> dict:
    """Everything :func:`save_checkpoint` wrote, for this process; clear errors for missing or corrupt files."""
    folder = resolve(folder)
    rng_path = folder / f"rng_state_{process_index}.pt"
    if not rng_path.is_file():
        raise FileNotFoundError(f"{rng_path} is missing: the checkpoint was written by fewer processes than "
                                f"this run has; resume with the same number of processes")
    try:
        trainer_state = json.loads((folder / STATE_FILE).read_text())
        if not isinstance(trainer_state, dict) or "epoch" not in trainer_state:
            raise ValueError("no 'epoch' in it")
    except (ValueError, UnicodeDecodeError) as error:
        raise ValueError(f"checkpoint {str(folder)!r}: {STATE_FILE} is corrupt ({error}); "
                         "resume from an earlier checkpoint") from None
    try:
        trainable = load_file(folder / WEIGHTS_FILE)
    except FileNotFoundError:
        raise FileNotFoundError(f"checkpoint {str(folder)!r} is incomplete: {WEIGHTS_FILE} is missing") from None
    except (SafetensorError, OSError, ValueError) as error:
        raise ValueError(f"checkpoint {str(folder)!r}: {WEIGHTS_FILE} is corrupt ({error}); "
                         "resume from an earlier checkpoint") from None
    loaded = {name[:-3]: _load_torch(folder / name, folder) for name in TORCH_FILES}
    return {"trainable": trainable, **loaded, "trainer_state": trainer_state,
            "rng_state": _load_torch(rng_path, folder)}


def list_checkpoints(run_dir) -> list[Path]:
    """Complete checkpoints under ``run_dir/checkpoints``, oldest first.

    A temporary ``.checkpoint-<n>.tmp`` folder (a save that was interrupted) never counts. A
    ``.checkpoint-<n>.old`` folder (the previous copy of a re-saved epoch) counts only when the
    save that moved it aside died before ``checkpoint-<n>`` took its place.
    """
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found: dict[int, Path] = {}
    for pattern in (_MOVED_ASIDE, _NAME):  # the final name wins over a moved-aside copy
        for p in root.iterdir():
            if (m := pattern.match(p.name)) and (p / STATE_FILE).is_file():
                found[int(m.group(1))] = p
    return [found[k] for k in sorted(found)]


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
    """Keep the ``limit`` newest checkpoints (0 keeps all); drop folders left by interrupted saves.

    Call it only between saves (no other process is writing a checkpoint).
    """
    root = Path(run_dir) / "checkpoints"
    if root.is_dir():
        for stale in root.iterdir():
            if _TEMPORARY.match(stale.name):
                shutil.rmtree(stale, ignore_errors=True)
    if limit > 0:
        for old in list_checkpoints(run_dir)[:-limit]:
            shutil.rmtree(old, ignore_errors=True)


def replace_files(folder, write) -> Path:
    """Run ``write(tmp_folder)`` and move every file it wrote into ``folder``, each with an atomic rename.

    A crash or a full disk leaves each file either as it was or fully replaced, never half-written.
    """
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".pxpo-tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    except OSError as error:
        raise _write_error(error, "weights to", folder) from error
    try:
        write(tmp)
        for path in tmp.rglob("*"):
            if path.is_file():
                _fsync(path)
        for path in sorted(tmp.rglob("*")):
            target = folder / path.relative_to(tmp)
            if path.is_dir():
                target.mkdir(exist_ok=True)
            else:
                os.replace(path, target)
        _fsync(folder)
    except _WRITE_ERRORS as error:
        raise _write_error(error, "weights to", folder) from error
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder
