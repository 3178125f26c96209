"""PNG plots of a fit: the confusion matrix and the cross-validation score against C.

Uses matplotlib's Agg canvas directly (no pyplot), so it neither needs a display nor changes the caller's backend.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

ANNOTATE_MAX_CLASSES = 30


def write_plots(metrics: dict, folder) -> list[Path]:
    """Write confusion_matrix.png and cv_curve.png (those the metrics allow) into `folder`; return their paths."""
    folder = Path(folder)
    written = []
    if metrics.get("confusion_matrix"):
        written.append(_save(_confusion_figure(metrics), folder / "confusion_matrix.png"))
    if metrics.get("cv"):
        written.append(_save(_cv_figure(metrics["cv"]), folder / "cv_curve.png"))
    return written


def _figure(size):
    from matplotlib.figure import Figure

    return Figure(figsize=size, dpi=100, layout="constrained")


def _save(fig, path: Path) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig).print_png(path)
    return path


def _confusion_figure(metrics: dict):
    names = metrics["classes"]
    matrix = np.asarray(metrics["confusion_matrix"])
    side = min(16, 3 + 0.45 * len(names))
    fig = _figure((side + 1, side))
    ax = fig.add_subplot()
    image = ax.imshow(matrix, cmap="Blues")
    fig.colorbar(image, ax=ax, shrink=0.8)
    ticks = np.arange(len(names))
    ax.set_xticks(ticks, names, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(ticks, names, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"accuracy {metrics['accuracy']:.3f}, balanced {metrics['balanced_accuracy']:.3f}")
    if len(names) <= ANNOTATE_MAX_CLASSES:
        threshold = matrix.max() / 2
        for (i, j), count in np.ndenumerate(matrix):
            ax.text(j, i, str(count), ha="center", va="center", fontsize=7,
                    color="white" if count > threshold else "black")
    return fig


def _cv_figure(cv: dict):
    fig = _figure((6, 4))
    ax = fig.add_subplot()
    grid, mean, std = (np.asarray(cv[k]) for k in ("grid", "mean", "std"))
    ax.fill_between(grid, mean - std, mean + std, alpha=0.2)
    ax.plot(grid, mean, marker="o", markersize=3)
    ax.axvline(cv["best"], color="tab:red", linestyle="--", label=f"chosen C = {cv['best']:.3g}")
    ax.set_xscale("log")
    ax.set_xlabel("C (inverse regularization strength)")
    ax.set_ylabel(f"{cv['folds']}-fold CV {cv['scoring']}")
    ax.legend()
    return fig
