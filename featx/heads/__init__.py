"""Heads on stored rows (the small-data path): fit, save without pickles, evaluate, predict.

    data.py         rows, labels and splits from featx stores and foreign HDF5/NPZ files
    estimators.py   the head types (logistic, ridge, linear-svm, sgd, mlp, knn) and the normalisation step
    mlp.py          the Linear-ReLU-Dropout-Linear head (torch training, numpy inference)
    knn.py          the weighted k-NN head (DINO's evaluation: cosine, exp(cos / T) votes)
    search.py       exact cosine search over rows in chunks: top k, duplicate pairs, k-NN votes
    neighbors.py    featx neighbors: a store's rows nearest to images or rows, and its near-duplicates
    cv.py           choosing C by k-fold cross-validation on a log grid
    inmemory.py     training on rows in memory: CV folds in parallel, convergence recorded, refit
    streaming.py    partial_fit training over store chunks (sgd)
    torchfit.py     the logistic head by full-batch L-BFGS in torch on the CPU or CUDA (--solver torch)
    model.py        Head (what users hold) and ArrayModel (the pickle-free estimator)
    persistence.py  the head folder: atomic writes, loading without running code
    metrics.py      metrics and the printed table;  plots.py  the PNGs
    api.py          fit_head, evaluate;  prediction.py  predict on images or feature files

The names below are imported on first use, so that `featx --help` does not load scikit-learn.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "fit_head": "api",
    "evaluate": "api",
    "load_head": "persistence",
    "predict": "prediction",
    "Predictions": "prediction",
    "Head": "model",
    "HEAD_TYPES": "estimators",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'featx.heads' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
