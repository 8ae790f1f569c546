"""Figures: image grids and heatmaps, written atomically as PNG (matplotlib, Agg backend)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import torch


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | os.PathLike) -> Path:
    from hprune.io import atomic_file

    path = Path(path)
    with atomic_file(path, mode="wb") as f:
        fig.savefig(f, format="png", dpi=120, bbox_inches="tight")
    _pyplot().close(fig)
    return path


def image_grid(rows: dict[str, torch.Tensor], path: str | os.PathLike, title: str | None = None,
               col_labels: Sequence[str] | None = None) -> Path:
    """One row per entry of `rows` (label -> images (n, 3, H, W) in [0, 1]); writes a PNG."""
    plt = _pyplot()
    labels = list(rows)
    n = max(v.shape[0] for v in rows.values())
    fig, axes = plt.subplots(len(labels), n, figsize=(1.6 * n + 1.2, 1.7 * len(labels) + 0.4), squeeze=False)
    for r, label in enumerate(labels):
        imgs = rows[label]
        for c in range(n):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c < imgs.shape[0]:
                ax.imshow(imgs[c].permute(1, 2, 0).clamp(0, 1).cpu().numpy(), interpolation="nearest")
            if c == 0:
                ax.set_ylabel(label, fontsize=8)
            if r == 0 and col_labels is not None and c < len(col_labels):
                ax.set_title(col_labels[c], fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    return _save(fig, path)


def heatmap(values: Sequence[Sequence[float | None]], row_labels: Sequence[str], col_labels: Sequence[str],
            path: str | os.PathLike, title: str = "", cbar_label: str = "", log: bool = True,
            blank_note: str = "blank: no value") -> Path:
    """A rows x cols heatmap; None cells are blank (e.g. a component a block does not have) and
    `blank_note`, printed under the plot when there are any, says why."""
    return _save(heatmap_figure(values, row_labels, col_labels, title, cbar_label, log, blank_note), path)


def heatmap_figure(values: Sequence[Sequence[float | None]], row_labels: Sequence[str], col_labels: Sequence[str],
                   title: str = "", cbar_label: str = "", log: bool = True, blank_note: str = "blank: no value"):
    """The matplotlib figure `heatmap` writes."""
    import numpy as np
    from matplotlib.colors import LogNorm

    plt = _pyplot()
    arr = np.array([[np.nan if v is None else float(v) for v in row] for row in values], dtype=float)
    finite = arr[np.isfinite(arr)]
    norm = None
    if log and finite.size and (finite > 0).any():
        pos = finite[finite > 0]
        norm = LogNorm(vmin=max(pos.min(), 1e-12), vmax=max(pos.max(), pos.min() * 10))
        arr = np.where(arr <= 0, np.nan if norm is None else pos.min(), arr)
    fig, ax = plt.subplots(figsize=(1.0 + 0.9 * len(col_labels), 0.8 + 0.28 * len(row_labels)))
    im = ax.imshow(arr, aspect="auto", cmap="viridis", norm=norm)
    ax.set_xticks(range(len(col_labels)), col_labels, rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(len(row_labels)), row_labels, fontsize=7)
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, label=cbar_label)
    if any(v is None for row in values for v in row):
        import textwrap

        # as the x-axis label, the note sits below the rotated tick labels whatever their length
        # (a figure-level text at a fixed height was drawn over them)
        width = max(40, int(12 * fig.get_figwidth()))
        ax.set_xlabel(textwrap.fill(blank_note, width), fontsize=7, style="italic", loc="left")
    return fig


def ema(values: Sequence[float], span: int) -> list[float]:
    """Exponential moving average with weight 2 / (span + 1), bias-corrected at the start (as
    TensorBoard's smoothing), so the first points are not pulled towards 0."""
    a = 2.0 / (span + 1)
    out, m, w = [], 0.0, 0.0
    for v in values:
        m = (1 - a) * m + a * float(v)
        w = (1 - a) * w + a
        out.append(m / w)
    return out


def line_plot(series: dict[str, Sequence[float]], path: str | os.PathLike, title: str = "", xlabel: str = "",
              ylabel: str = "", logy: bool = False, smooth: int | None = None) -> Path:
    """One line per named series (x = index); writes a PNG. `smooth`: also an EMA over about
    `smooth` points per series (the trend), the raw values drawn faint behind it."""
    return _save(line_figure(series, title, xlabel, ylabel, logy, smooth), path)


def line_figure(series: dict[str, Sequence[float]], title: str = "", xlabel: str = "", ylabel: str = "",
                logy: bool = False, smooth: int | None = None):
    """The matplotlib figure `line_plot` writes."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.4))
    for label, ys in series.items():
        ys = list(ys)
        if smooth and len(ys) > 2:
            (raw,) = ax.plot(range(len(ys)), ys, linewidth=0.7, alpha=0.25)
            ax.plot(range(len(ys)), ema(ys, smooth), color=raw.get_color(), linewidth=1.6,
                    label=f"{label} (EMA {smooth})")
        else:
            ax.plot(range(len(ys)), ys, label=label, linewidth=1.2)
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig
