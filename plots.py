"""Figures: image grids (images in [-1, 1], converted once, here), labelled grids, and line plots, drawn
off-screen with matplotlib's Agg backend (no display needed). Every lesson's grids and loss curves, and
every measurement plot of tools/, go through these few functions.
"""
from __future__ import annotations

import textwrap

import numpy as np
import torch


def save_grid(x: torch.Tensor, path: str, nrow: int = 8, padding: int = 2) -> None:
    """Save images in [-1, 1] as one PNG grid (torchvision's make_grid/save_image)."""
    from torchvision.utils import save_image
    save_image(((x.detach().float().cpu() + 1) / 2).clamp(0, 1), path, nrow=nrow, padding=padding)

def save_labelled_grid(x: torch.Tensor, path: str, nrow: int, rows: list[str], title: str, xlabel: str = "") -> None:
    """Images in [-1, 1], `nrow` a row, with row names on the left, `xlabel` below and `title` above."""
    from torchvision.utils import make_grid
    grid = make_grid(((x.detach().float().cpu() + 1) / 2).clamp(0, 1), nrow=nrow, padding=2)  # (3, H, W)
    width = max(5.0, 1.3 + grid.shape[2] / 60)                  # twice the pixels of the images
    title = textwrap.fill(title, int(width * 12))                # about 12 characters an inch at 10 pt
    fig, ax = figure(figsize=(width, 1.0 + 0.2 * title.count("\n") + grid.shape[1] / 60))
    ax.imshow(grid.permute(1, 2, 0).numpy(), interpolation="nearest")
    ax.set_yticks([(i + 0.5) * grid.shape[1] / len(rows) for i in range(len(rows))], rows)
    ax.set_xticks([])
    ax.set_xlabel(xlabel, fontsize=9)
    ax.set_title(title, fontsize=10)
    save_figure(fig, path, grid=False)

def figure(nrows: int = 1, ncols: int = 1, **kwargs):
    """-> (fig, axes) of plt.subplots, drawn off-screen (the Agg backend: no display needed)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt.subplots(nrows, ncols, **kwargs)

def save_figure(fig, path: str, dpi: int = 120, grid: bool = True, legend: float = 8) -> None:
    """Grid and legend (font size `legend`, 0: none) on each labelled panel, tight layout, PNG, figure closed."""
    import matplotlib.pyplot as plt
    for ax in fig.axes:
        if grid:
            ax.grid(alpha=0.3)
        if legend and ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=legend)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi, bbox_inches="tight")           # long row labels stay inside
    plt.close(fig)

def plot_curves(path: str, curves: dict, xlabel: str = "step", ylabel: str = "loss",
                logy: bool = True, title: str | None = None) -> None:
    """Line plot of named curves, each a list of (x, y) pairs or a list of y values."""
    fig, ax = figure(figsize=(6, 4))
    for name, values in curves.items():
        xs, ys = zip(*values) if len(values) and isinstance(values[0], (tuple, list)) else (range(len(values)), values)
        ax.plot(xs, ys, label=name, lw=1.2)
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title or "", yscale="log" if logy else "linear")
    save_figure(fig, path, legend=10 if len(curves) > 1 else 0)

def smooth(values: list[float], k: int = 50) -> list[tuple[int, float]]:
    """Running mean over k points of a per-step loss, as (step, value) pairs for plot_curves."""
    if len(values) < k:
        return list(enumerate(values))
    v = np.convolve(np.asarray(values, dtype=np.float64), np.ones(k) / k, mode="valid")
    return list(zip(range(k - 1, len(values)), v.tolist()))
