"""Class weights for the heads that take a table per class (SGD's partial_fit, the MLP, the torch solver)."""
from __future__ import annotations

import numpy as np


def balanced_weights(y: np.ndarray, n_classes: int) -> dict[int, float]:
    """scikit-learn's 'balanced' class weights as a dict (partial_fit cannot take 'balanced')."""
    counts = np.bincount(y, minlength=n_classes)
    return {k: len(y) / (n_classes * counts[k]) for k in range(n_classes) if counts[k]}
