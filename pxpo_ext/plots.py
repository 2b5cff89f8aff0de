"""Figures for runs: sample grids with reward-heatmap overlays, and training curves.

Everything renders through matplotlib's object API on an Agg canvas (no ``pyplot``), so it works
without a display, does not touch matplotlib's global backend, and can run from any thread.
Files are written atomically (:func:`atomic_write`): a crash never leaves a half-written PNG.
"""
from __future__ import annotations

import io
import math
import os
import tempfile
import textwrap
from collections.abc import Sequence
from pathlib import Path

import numpy as np

# Pink = negative reward, green = positive: diverging, readable by most colour-blind viewers, and it
# does not reuse the red/blue that colour rewards talk about.
HEATMAP_CMAP = "PiYG"
HEATMAP_ALPHA = 0.6
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)  # ITU-R BT.601 luma weights
_PANEL_INCHES = 2.6


def atomic_write(path: str | os.PathLike, data: bytes | str) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = data.encode("utf-8") if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _to_numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):  # torch.Tensor, without importing torch here
        x = x.detach().float().cpu().numpy()
    return np.asarray(x)


def images_to_hwc(images) -> list[np.ndarray]:
    """``(B, 3, H, W)`` tensor/array in ``[0, 1]`` (or uint8), or a list of PIL images -> float HWC arrays."""
    if isinstance(images, (list, tuple)):
        arrays = [_to_numpy(im) for im in images]
        batch = [a if a.ndim == 3 and a.shape[-1] in (1, 3, 4) else np.moveaxis(a, 0, -1) for a in arrays]
    else:
        array = _to_numpy(images)
        if array.ndim != 4 or array.shape[1] not in (1, 3):
            raise ValueError(f"images must have shape (B, 3, H, W) (or be a list of images); got {array.shape}")
        batch = list(np.moveaxis(array, 1, -1))
    out = []
    for a in batch:
        a = a.astype(np.float32) / 255.0 if a.dtype == np.uint8 else a.astype(np.float32)
        if a.shape[-1] == 1:
            a = np.repeat(a, 3, axis=-1)
        out.append(np.clip(np.nan_to_num(a[..., :3]), 0.0, 1.0))
    return out


def _maps_to_list(maps, batch: int, what: str) -> list[np.ndarray] | None:
    """Per-image 2-D maps from ``(B,)`` scalars, ``(B, h, w)`` or ``(B, 1, h, w)`` maps, or a list."""
    if maps is None:
        return None
    items = [_to_numpy(m) for m in maps] if isinstance(maps, (list, tuple)) else list(_to_numpy(maps))
    if len(items) != batch:
        raise ValueError(f"got {len(items)} {what} for {batch} images; pass one per image")
    out = []
    for m in items:
        m = np.squeeze(np.asarray(m, dtype=np.float32))
        if m.ndim == 0:
            m = m.reshape(1, 1)  # a scalar reward is a constant map
        if m.ndim != 2:
            raise ValueError(f"each of the {what} must be a scalar or an (h, w) map; got shape {m.shape}")
        out.append(m)
    return out


def _caption(text: str, width: int = 34, lines: int = 2) -> str:
    wrapped = textwrap.wrap(text, width) or [""]
    if len(wrapped) > lines:
        wrapped = wrapped[:lines]
        wrapped[-1] = wrapped[-1][: width - 1] + "…"
    return "\n".join(wrapped)


def sample_grid_figure(
    images,
    captions: Sequence[str],
    reward_maps=None,
    weight_maps=None,
    max_columns: int = 4,
):
    """A figure with one cell per image; with ``reward_maps``, each image is followed by a grey copy
    of it under its reward heatmap (one symmetric colour scale for the whole grid, so cells compare).

    ``reward_maps`` may be at image or latent resolution (they are stretched over the image) or per
    image scalars. ``weight_maps`` (optional, same shapes) hide the heatmap where the weight is 0.
    """
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure

    hwc = images_to_hwc(images)
    batch = len(hwc)
    if batch == 0:
        raise ValueError("no images to draw")
    if len(captions) != batch:
        raise ValueError(f"got {len(captions)} captions for {batch} images")
    rewards = _maps_to_list(reward_maps, batch, "reward maps")
    weights = _maps_to_list(weight_maps, batch, "weight maps")
    if weights is not None and rewards is None:
        raise ValueError("weight maps need reward maps")

    per_item = 1 if rewards is None else 2
    columns = min(max_columns, math.ceil(math.sqrt(batch)))
    rows = math.ceil(batch / columns)
    fig = Figure(figsize=(_PANEL_INCHES * columns * per_item + (0.6 if rewards else 0), _PANEL_INCHES * rows + 0.2))
    norm = None
    if rewards is not None:
        finite = [np.abs(m[np.isfinite(m)]) for m in rewards]
        vmax = max((float(f.max()) for f in finite if f.size), default=0.0) or 1e-8
        norm = Normalize(vmin=-vmax, vmax=vmax)
    heat = None
    for k, image in enumerate(hwc):
        row, col = divmod(k, columns)
        height, width = image.shape[:2]
        extent = (-0.5, width - 0.5, height - 0.5, -0.5)
        ax = fig.add_subplot(rows, columns * per_item, row * columns * per_item + col * per_item + 1)
        ax.imshow(image, interpolation="nearest", extent=extent)
        ax.set_title(_caption(captions[k]), fontsize=8)
        ax.set_axis_off()
        if rewards is None:
            continue
        ax = fig.add_subplot(rows, columns * per_item, row * columns * per_item + col * per_item + 2)
        # Under the heatmap the image is grey, so every hue on this panel is the reward's.
        ax.imshow(image @ _LUMA, cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest", extent=extent)
        rmap = rewards[k]
        alpha = HEATMAP_ALPHA
        if weights is not None:
            if weights[k].shape != rmap.shape:
                raise ValueError(f"weight map {k} has shape {weights[k].shape} but its reward map {rmap.shape}")
            alpha = HEATMAP_ALPHA * np.clip(weights[k], 0.0, 1.0)
            mean = float((rmap * weights[k]).sum() / max(weights[k].sum(), 1e-12))
        else:
            mean = float(rmap.mean())
        heat = ax.imshow(rmap, cmap=HEATMAP_CMAP, norm=norm, alpha=alpha, interpolation="nearest", extent=extent)
        ax.set_title(f"reward {mean:+.4g}", fontsize=8)
        ax.set_axis_off()
    if heat is not None:
        fig.subplots_adjust(right=1 - 0.6 / fig.get_figwidth())
        cax = fig.add_axes((1 - 0.45 / fig.get_figwidth(), 0.1, 0.12 / fig.get_figwidth(), 0.8))
        fig.colorbar(heat, cax=cax).ax.tick_params(labelsize=7)
    return fig


def _series(records: Sequence[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    """``(x, y)`` for ``key`` over records that hold a finite number for it; x is samples seen."""
    xs, ys = [], []
    for i, r in enumerate(records):
        value = r.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            x = r.get("samples_seen", r.get("epoch", i))
            xs.append(float(x) if isinstance(x, (int, float)) else float(i))
            ys.append(float(value))
    return np.asarray(xs), np.asarray(ys)


TRAINING_CURVES = ("loss", "approx_kl", "clipfrac")


def curves_figure(records: Sequence[dict]):
    """Reward mean ± std against samples seen, then one small panel per training statistic present."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    extra = [key for key in TRAINING_CURVES if _series(records, key)[0].size]
    fig = Figure(figsize=(6.4, 3.6 + 1.8 * len(extra)))
    grid = fig.add_gridspec(1 + len(extra), 1, height_ratios=[2] + [1] * len(extra), hspace=0.45)
    x_label = "samples seen" if any("samples_seen" in r for r in records) else "epoch"
    ax = fig.add_subplot(grid[0])
    x, mean = _series(records, "reward_mean")
    if x.size:
        x_std, std = _series(records, "reward_std")
        ax.plot(x, mean, marker="o", markersize=3, label="reward mean")
        if x_std.size == x.size and np.array_equal(x_std, x):
            ax.fill_between(x, mean - std, mean + std, alpha=0.25, label="± std")
        ax.legend(loc="best", fontsize=8)
    else:
        ax.text(0.5, 0.5, "no reward logged yet", ha="center", va="center", transform=ax.transAxes)
    ax.set_ylabel("reward")
    ax.set_xlabel(x_label)
    ax.grid(alpha=0.3)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # samples and epochs are counts
    for k, key in enumerate(extra):
        ax = fig.add_subplot(grid[k + 1])
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.plot(*_series(records, key), marker=".", markersize=3, color=f"C{k + 1}")
        ax.set_ylabel(key, fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    ax.set_xlabel(x_label)
    return fig


def figure_png(fig, dpi: int = 100) -> bytes:
    """The figure as PNG bytes (Agg canvas)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight", pad_inches=0.1)
    return buffer.getvalue()


def png_to_array(png: bytes) -> np.ndarray:
    """Decode PNG bytes to an ``(H, W, 3)`` uint8 array (what tensorboard's ``add_image`` takes as HWC)."""
    from PIL import Image

    with Image.open(io.BytesIO(png)) as im:
        return np.asarray(im.convert("RGB"))


def grid_dpi(images) -> int:
    """A dpi at which a panel shows an image at about its own resolution (100 to 200 dpi)."""
    height = images_to_hwc(images[:1])[0].shape[0]
    return int(min(200, max(100, height / _PANEL_INCHES)))
