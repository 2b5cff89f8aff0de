"""What a training run leaves in its folder: ``metrics.jsonl``, tensorboard events, a reward curve,
sample grids with reward heatmaps, and a text summary.

Only the main process reports; other processes build ``RunReporter(..., enabled=False)``, which
creates and writes nothing. Every file is replaced atomically (temporary file, then rename), so a
run killed at any moment leaves readable files.

Run folder::

    metrics.jsonl          one JSON object per epoch (non-finite numbers are written as null)
    reward_curve.png       reward mean ± std against samples seen, with loss / approx_kl / clipfrac
    samples_<tag>.png      each image beside its reward heatmap (over a grey copy), prompts as captions
    tensorboard/           scalars (step = epoch) and sample grids, for ``tensorboard --logdir``
"""
from __future__ import annotations

import json
import math
import numbers
import re
import warnings
from pathlib import Path

from .. import plots

METRICS_FILE = "metrics.jsonl"
CURVE_FILE = "reward_curve.png"
TENSORBOARD_DIR = "tensorboard"


def _plain(value):
    """``value`` as JSON-ready Python: tensors and numpy scalars unwrapped, non-finite floats as None."""
    if hasattr(value, "detach"):  # torch.Tensor
        value = value.detach().cpu()
        value = value.item() if value.numel() == 1 else value.tolist()
    elif hasattr(value, "tolist") and not isinstance(value, (str, bytes)):  # numpy array or scalar
        value = value.tolist()
    if isinstance(value, bool) or value is None or isinstance(value, (str, int)):
        return value
    if isinstance(value, numbers.Real):
        value = float(value)
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return str(value)


def _tag_for_filename(tag: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", str(tag)).strip("._")
    if not safe:
        raise ValueError(f"sample tag {tag!r} has no usable characters; use letters, digits, '.', '_' or '-'")
    return safe


class RunReporter:
    """Writes a run's metrics, curves and sample grids under ``run_dir`` (see the module docstring).

    ``log_epoch`` replaces any records of the same or later epochs already in ``metrics.jsonl``,
    so a run resumed from an earlier checkpoint into the same folder keeps one consistent history.
    """

    def __init__(self, run_dir, use_tensorboard: bool = True, enabled: bool = True):
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self._records: list[dict] = []
        self._writer = None
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._records = self._read_metrics()
        if use_tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as err:  # the files above are still written
                warnings.warn(
                    f"tensorboard logging is off: {err}. Install it (pip install tensorboard) or pass "
                    "use_tensorboard=False to silence this warning.",
                    stacklevel=2,
                )
            else:
                self._writer = SummaryWriter(log_dir=str(self.run_dir / TENSORBOARD_DIR))

    @property
    def metrics_path(self) -> Path:
        return self.run_dir / METRICS_FILE

    @property
    def records(self) -> list[dict]:
        """The epoch records logged so far (including those found in the folder at start)."""
        return list(self._records)

    def _read_metrics(self) -> list[dict]:
        if not self.metrics_path.exists():
            return []
        records = []
        for number, line in enumerate(self.metrics_path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(
                    f"{self.metrics_path}:{number} is not valid JSON ({err}); "
                    "move the file away or use a new run folder"
                ) from err
            if isinstance(record, dict):
                records.append(record)
        return records

    def log_epoch(self, metrics: dict) -> dict:
        """Record one epoch's metrics (must include ``epoch``); returns the record as written."""
        if not self.enabled:
            return {}
        record = _plain(dict(metrics))
        epoch = record.get("epoch")
        if not isinstance(epoch, int) or isinstance(epoch, bool):
            raise ValueError(f"epoch metrics need an integer 'epoch'; got {metrics.get('epoch')!r}")
        self._records = [r for r in self._records if not (isinstance(r.get("epoch"), int) and r["epoch"] >= epoch)]
        self._records.append(record)
        lines = "".join(json.dumps(r, allow_nan=False) + "\n" for r in self._records)
        plots.atomic_write(self.metrics_path, lines)
        if self._writer is not None:
            for key, value in record.items():
                if key != "epoch" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._writer.add_scalar(key, value, global_step=epoch)
            self._writer.flush()
        return record

    def log_samples(self, tag: str, images, prompts, reward_maps=None, step: int = 0, weight_maps=None):
        """Save ``samples_<tag>.png``: each image (``(B, 3, H, W)`` in ``[0, 1]``) captioned with its
        prompt, beside its reward heatmap when ``reward_maps`` (per-image scalars or maps at any
        resolution) are given; also logged to tensorboard at ``step``. Returns the PNG's path."""
        if not self.enabled:
            return None
        fig = plots.sample_grid_figure(images, list(prompts), reward_maps=reward_maps, weight_maps=weight_maps)
        png = plots.figure_png(fig, dpi=plots.grid_dpi(images))
        path = plots.atomic_write(self.run_dir / f"samples_{_tag_for_filename(tag)}.png", png)
        if self._writer is not None:
            self._writer.add_image(f"samples/{tag}", plots.png_to_array(png), global_step=step, dataformats="HWC")
            self._writer.flush()
        return path

    def plot_curves(self):
        """Write ``reward_curve.png`` from the logged epochs; returns its path (None if nothing is logged)."""
        if not self.enabled or not self._records:
            return None
        return plots.atomic_write(self.run_dir / CURVE_FILE, plots.figure_png(plots.curves_figure(self._records)))

    def summary(self) -> str:
        """A few lines: epochs, samples, reward first → last epoch, time, and where the files are."""
        if not self.enabled:
            return ""
        if not self._records:
            return f"no epochs logged yet; run folder: {self.run_dir}"
        first, last = self._records[0], self._records[-1]

        def fmt(value, spec=".4g"):
            return format(value, spec) if isinstance(value, (int, float)) else "n/a"

        seconds = sum(r["seconds"] for r in self._records if isinstance(r.get("seconds"), (int, float)))
        lines = [
            f"epochs: {len(self._records)} (epoch {first['epoch']} to {last['epoch']}), "
            f"samples seen: {fmt(last.get('samples_seen'), 'g')}",
            f"reward mean: {fmt(first.get('reward_mean'))} -> {fmt(last.get('reward_mean'))} "
            f"(std {fmt(first.get('reward_std'))} -> {fmt(last.get('reward_std'))})",
            f"time: {seconds:.1f} s in the logged epochs",
            f"run folder: {self.run_dir}",
        ]
        for path in sorted(self.run_dir.iterdir()):
            if path.name.startswith("."):  # temporaries of atomic writes
                continue
            if path.name == TENSORBOARD_DIR:
                lines.append(f"  {TENSORBOARD_DIR}/ (tensorboard --logdir {path})")
            else:
                lines.append(f"  {path.name}{'/' if path.is_dir() else ''}")
        return "\n".join(lines)

    def close(self) -> None:
        """Flush and close tensorboard; safe to call more than once."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
