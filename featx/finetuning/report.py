"""What a run reports: the per-epoch metrics row, its one-line summary, and curves.png."""
from __future__ import annotations

from pathlib import Path

from .checkpoint import atomic_write
from .loop import PassStats


def epoch_row(epoch: int, train: PassStats, val: PassStats | None, lrs: dict[str, float], seconds: float) -> dict:
    """One line of metrics.jsonl."""
    return {
        "epoch": epoch,
        "train_loss": train.loss,
        "train_acc": train.acc,
        "val_loss": val.loss if val else None,
        "val_acc": val.acc if val else None,
        "lr": lrs["head"],
        "backbone_lr": lrs["backbone"],
        "seconds": round(seconds, 3),
        "images_per_second": round(train.images_per_second, 2),
        "skipped_images": train.skipped + (val.skipped if val else 0),
        **{f"train_{name}": value for name, value in train.extra.items()},
        **{f"val_{name}": value for name, value in (val.extra if val else {}).items()},
    }


def summary_line(row: dict, epochs: int) -> str:
    """'Epoch 3/10  train loss 0.41 acc 0.87  val loss 0.38 acc 0.90  12.3s 210 img/s'."""
    val = f"  val loss {row['val_loss']:.4g} acc {row['val_acc']:.4f}" if row["val_acc"] is not None else ""
    val += "".join(f" {key[4:]} {value:.4f}" for key, value in row.items()
                   if key.startswith("val_") and key not in ("val_loss", "val_acc") and isinstance(value, float))
    return (
        f"Epoch {row['epoch']}/{epochs}  train loss {row['train_loss']:.4g} acc {row['train_acc']:.4f}{val}  "
        f"{row['seconds']:.1f}s {row['images_per_second']:.0f} img/s"
    )


def write_curves(history: list[dict], path: Path, loss_name: str = "cross-entropy", acc_name: str = "accuracy") -> None:
    """curves_figure as a PNG (matplotlib's Agg canvas, no pyplot), written atomically."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    atomic_write(path, FigureCanvasAgg(curves_figure(history, loss_name, acc_name)).print_png)


def curves_figure(history: list[dict], loss_name: str = "cross-entropy", acc_name: str = "accuracy"):
    """Loss and accuracy per epoch, train and val, on axes labelled with what the loss and the accuracy are."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 3.5), dpi=100, layout="constrained")
    epochs = [row["epoch"] for row in history]
    for ax, metric in zip(fig.subplots(1, 2), ("loss", "acc")):
        for split in ("train", "val"):
            values = [row[f"{split}_{metric}"] for row in history]
            if any(v is not None for v in values):
                ax.plot(epochs, values, marker="o", label=split)
        ax.set_xlabel("epoch")
        ax.set_ylabel(acc_name if metric == "acc" else loss_name)
        ax.grid(alpha=0.3)
        ax.legend()
    return fig
