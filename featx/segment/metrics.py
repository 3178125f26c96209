"""Segmentation metrics from a confusion matrix over pixels (IGNORE pixels left out).

    pixel_acc   correct pixels / pixels
    iou[c]      TP / (TP + FP + FN) of class c, for classes present in the truth or the prediction
    miou        mean of iou over those classes, background included (the VOC convention)
    dice        mean over the foreground classes present of 2 TP / (2 TP + FP + FN) (binary: the foreground's)
"""
from __future__ import annotations

import numpy as np
import torch

from .source import IGNORE


def confusion(true: torch.Tensor, pred: torch.Tensor, n_classes: int) -> torch.Tensor:
    """(n_classes, n_classes) int64 counts, rows = truth, columns = prediction, over pixels not IGNORE."""
    true, pred = true.reshape(-1), pred.reshape(-1)
    keep = true != IGNORE
    index = true[keep] * n_classes + pred[keep]
    return torch.bincount(index, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def predicted_ids(logits: torch.Tensor) -> torch.Tensor:
    """Class ids (B, H, W) from logits (B, K, H, W): argmax, or logit > 0 for one binary channel."""
    return (logits[:, 0] > 0).long() if logits.shape[1] == 1 else logits.argmax(1)


def summarize(matrix, classes: list[str]) -> dict:
    """pixel_acc, miou, dice and per-class IoU / Dice (None for a class absent from truth and prediction)."""
    m = np.asarray(matrix, dtype=np.float64)
    tp = np.diag(m)
    fp, fn = m.sum(0) - tp, m.sum(1) - tp
    union = tp + fp + fn
    present = union > 0
    iou = np.where(present, tp / np.maximum(union, 1), np.nan)
    dice = np.where(present, 2 * tp / np.maximum(2 * tp + fp + fn, 1), np.nan)
    foreground = present.copy()
    foreground[0] = False
    total = m.sum()
    return {
        "pixel_acc": float(tp.sum() / total) if total else 0.0,
        "miou": float(iou[present].mean()) if present.any() else 0.0,
        "dice": float(dice[foreground].mean()) if foreground.any() else 0.0,
        "iou": {c: (None if np.isnan(v) else float(v)) for c, v in zip(classes, iou)},
        "dice_per_class": {c: (None if np.isnan(v) else float(v)) for c, v in zip(classes, dice)},
        "pixels": int(total),
    }
