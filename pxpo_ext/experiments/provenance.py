"""What every result is reported with: the command that made it, the machine, and the wall time."""
from __future__ import annotations

import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

from ..plots import atomic_write

REPO = Path(__file__).resolve().parents[2]


def machine_description() -> str:
    """e.g. ``"2-core CPU, no GPU, torch 2.13.0"``; the GPU's name when there is one."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return f"{cores}-core CPU ({platform.machine()}), {gpu}, torch {torch.__version__}"


def script_path(name: str) -> Path:
    """The command-line program ``python/<name>.py``, which a record names as the command that made it."""
    return REPO / "python" / f"{name}.py"


def command_line(script: str | Path, argv: list[str] | None = None) -> str:
    """``python <script relative to the repository> <arguments>``; ``argv=None`` takes this process's arguments."""
    path = Path(script).resolve()
    try:
        path = path.relative_to(REPO)
    except ValueError:
        pass
    return shlex.join(["python", str(path), *(sys.argv[1:] if argv is None else argv)])


def model_fingerprint(model: str | None) -> str:
    """The first 12 hex digits of the SHA-256 of the UNet weights (``model=None``: the embedded model)."""
    import hashlib

    if model is None:
        from ..embedded import pipeline_path

        folder = pipeline_path()
    else:
        folder = Path(model)
    files = sorted((folder / "unet").glob("*.safetensors")) if (folder / "unet").is_dir() else []
    if not files:
        return f"{model} (no local UNet weights to fingerprint)"
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.read_bytes())
    return f"{'embedded tiny-shapes' if model is None else model} unet sha256:{digest.hexdigest()[:12]}"


class Provenance:
    """Collects a result's command, seeds, machine and wall time; ``write`` saves them as JSON."""

    def __init__(self, experiment: str, script: str | Path, argv: list[str] | None = None):
        self.experiment = experiment
        self.started = time.time()
        self.record = {"experiment": experiment, "command": command_line(script, argv), "machine": machine_description(),
                       "started_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(self.started))}

    def add(self, **fields) -> None:
        self.record.update(fields)

    def write(self, folder) -> Path:
        self.record["wall_seconds"] = round(time.time() - self.started, 1)
        text = json.dumps(self.record, indent=2, sort_keys=False, default=str) + "\n"
        return atomic_write(Path(folder) / f"{self.experiment}_provenance.json", text)

    def print_results(self, folder, rows=()) -> None:
        """Print result rows (floats rounded) and the wall time recorded by :meth:`write`."""
        for row in rows:
            print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()})
        print(f"wall time {self.record['wall_seconds']} s; files in {folder}")
