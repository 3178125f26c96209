"""Tiny synthetic stores for the head tests: class blobs, random labels, regression targets."""
from __future__ import annotations

import numpy as np

from featx.store import write_store

CONFIG = {
    "backbone": "resnet18",
    "weights": "none",
    "weights_sha256": "a" * 64,
    "taps": ["avgpool", "layer4"],
    "pooling": "avg",
    "token_pool": "cls",
    "transform": {"resize": 36, "crop": 32},
    "precision": "fp32",
    "dtype": "float32",
}
CLASSES = ["ants", "bees", "wasps"]


def blobs(n=90, d=8, k=3, sep=4.0, seed=0):
    """(X float32, y) with k well separated Gaussian classes, rows in class order like an ImageFolder."""
    rng = np.random.default_rng(seed)
    y = np.sort(np.arange(n) % k)
    centers = rng.normal(size=(k, d)) * sep
    return (centers[y] + rng.normal(size=(n, d))).astype(np.float32), y


def write_rows(path, X, y=None, *, targets=None, splits=None, classes=CLASSES, config=CONFIG, extra_tap=True):
    """A featx store holding X at tap 'avgpool' (and a narrower 'layer4'), labels y or float targets."""
    n = len(X)
    features = {"avgpool": X}
    if extra_tap:
        features["layer4"] = X[:, :2]
    write_store(
        path, config=config, keys=[f"{i:064x}" for i in range(n)], paths=[f"img/{i:04d}.png" for i in range(n)],
        labels=None if y is None else np.asarray(y), targets=targets, splits=splits,
        classes=classes if targets is None else [], features=features,
    )
    return path


def every_fifth_val(n):
    """A 'train'/'val' split with every fifth row in val."""
    return np.where(np.arange(n) % 5 == 4, "val", "train")


def blob_store(path, n=90, d=8, k=3, seed=0, **kwargs):
    X, y = blobs(n, d, k, seed=seed)
    kwargs.setdefault("splits", every_fifth_val(n))
    write_rows(path, X, y, classes=CLASSES[:k], **kwargs)
    return X, y
