"""CSV files and PNG figures of the experiments (matplotlib's object API, no display needed)."""
from __future__ import annotations

import csv
import io
import math
import textwrap
from pathlib import Path

from .. import plots

COLOURS = {"pxpo": "C0", "ddpo": "C1"}


def write_csv(path, rows: list[dict]) -> Path:
    """``rows`` (dicts; the first row's keys, then any new ones, become the header) as a CSV file."""
    if not rows:
        raise ValueError(f"no rows to write to {path}")
    header = list(rows[0])
    for row in rows[1:]:
        header += [k for k in row if k not in header]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=header, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _cell(row.get(k)) for k in header})
    return plots.atomic_write(path, buffer.getvalue())


def _cell(value):
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.6g}"
    return "" if value is None else value


def efficiency_figure(curves: dict, target: float | None = None, reach: float | None = None, title: str = ""):
    """Mean reward against reward queries per method, with a band spanning the seeds (min to max).

    ``curves[name] = (queries (E,), rewards (S, E))``; ``target`` draws DDPO's final reward as a
    dashed line and ``reach`` marks where PXPO's mean crosses it.
    """
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.2))
    ax = fig.add_subplot()
    for name, (queries, rewards) in curves.items():
        colour = COLOURS.get(name.split()[0].lower())
        mean = rewards.mean(axis=0)
        label = f"{name} (mean of {rewards.shape[0]} seeds)"
        ax.plot(queries, mean, marker="o", markersize=3, color=colour, label=label)
        ax.fill_between(queries, rewards.min(axis=0), rewards.max(axis=0), color=colour, alpha=0.2)
        for run in rewards:
            ax.plot(queries, run, color=colour, alpha=0.35, linewidth=0.7)
    if target is not None:
        ax.axhline(target, color="grey", linestyle="--", linewidth=1, label="DDPO final reward")
    if reach is not None and math.isfinite(reach):
        ax.axvline(reach, color="grey", linestyle=":", linewidth=1, label=f"PXPO reaches it at {reach:.0f} queries")
    ax.set_xlabel("reward queries (images rewarded)")
    ax.set_ylabel("mean reward of the epoch's samples")
    ax.set_title(title or "band: min to max over seeds; thin lines: single seeds", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    return fig


def lr_grid_figure(grid: dict):
    """One panel per method: its curve at each learning rate tried (``grid[method][lr] = (queries, rewards)``)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.0 * len(grid), 3.4))
    for k, (method, by_lr) in enumerate(grid.items()):
        ax = fig.add_subplot(1, len(grid), k + 1)
        for j, (lr, (queries, rewards)) in enumerate(sorted(by_lr.items())):
            ax.plot(queries, rewards, marker="o", markersize=3, color=f"C{j + 2}", label=f"lr {lr:g}")
        ax.set_title(method, fontsize=10)
        ax.set_xlabel("reward queries")
        ax.set_ylabel("mean reward")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def before_after_figure(before, after, captions: list[str], before_scores=None, after_scores=None,
                        score_name: str = "reward", columns: int = 8):
    """Two stacked sample grids (rows of ``columns`` images): before training above, after below,
    each image titled with its score (e.g. its mean reward) when scores are given."""
    from matplotlib.figure import Figure

    n = len(captions)
    rows = math.ceil(n / columns)
    fig = Figure(figsize=(1.4 * columns, 2 * (1.55 * rows) + 0.4))
    for block, (label, images, scores) in enumerate((("before", before, before_scores), ("after", after, after_scores))):
        for i, image in enumerate(plots.images_to_hwc(images)):
            ax = fig.add_subplot(2 * rows, columns, block * rows * columns + i + 1)
            ax.imshow(image, interpolation="nearest")
            ax.set_axis_off()
            lines = textwrap.wrap(captions[i], 20)[:3] if block == 0 else []
            if scores is not None:
                lines.append(f"{label}: {score_name} {scores[i]:+.3f}")
            elif i % columns == 0:
                lines.append(label)
            ax.set_title("\n".join(lines), fontsize=5.5)
    fig.subplots_adjust(hspace=0.7, wspace=0.05)
    return fig


def save_png(fig, path, dpi: int = 120) -> Path:
    return plots.atomic_write(path, plots.figure_png(fig, dpi=dpi))
