"""Heads trained on rows held in memory: normalised once, cross-validated in parallel with joblib (one job per fold
walking C upwards with warm starts where the head supports them, else one job per (fold, C)), refit on all rows."""
from __future__ import annotations

import contextlib
import warnings

import numpy as np

from .cv import score
from .estimators import fit_normalizer

SMALL_WORK = 2_000_000  # rows x features x folds below which the folds run in-process (workers cost more)
# and with one BLAS thread: on small matrices threads only add synchronisation, badly so on a busy machine.


class InMemoryFit:
    """Training of one head type on store rows `train` (sorted) with targets `y` (class indices or values)."""

    def __init__(self, head_type, options, rows, train: np.ndarray, y: np.ndarray, n_classes: int, normalize: str,
                 chunk_rows: int, n_jobs: int | None):
        self.head_type, self.options, self.y, self.n_classes = head_type, options, y, n_classes
        self.normalizer, self.X = fit_normalizer(normalize, rows.read(train, chunk_rows))
        self.n_jobs = n_jobs
        self.folds: list = []
        self.scoring = "accuracy"

    def set_folds(self, folds, scoring: str) -> None:
        """Use (train, test) position pairs from cv.make_folds for `score_grid`."""
        self.folds, self.scoring = folds, scoring

    def score_grid(self, values: np.ndarray) -> np.ndarray:
        """(len(values), folds) held-out scores."""
        from joblib import Parallel, delayed

        step = len(values) if self.head_type.warm_start else 1
        jobs = [(start, f) for start in range(0, len(values), step) for f in range(len(self.folds))]
        small = self.X.size * len(self.folds) < SMALL_WORK
        args = (self.head_type, self.options, self.X, self.y, self.scoring, self.n_classes)
        with _one_blas_thread(small):
            paths = Parallel(n_jobs=1 if small else self.n_jobs)(
                delayed(_fold_path)(*args, *self.folds[f], values[start : start + step]) for start, f in jobs
            )
        scores = np.empty((len(values), len(self.folds)))
        for (start, f), path in zip(jobs, paths):
            scores[start : start + step, f] = path
        return scores

    def fit(self, C: float):
        """The head at C on all training rows, as Pipeline([('normalize', ...), ('head', estimator)])."""
        from sklearn.pipeline import Pipeline

        with _one_blas_thread(self.X.size < SMALL_WORK):
            estimator = self.head_type.build(C, len(self.y), self.options).fit(self.X, self.y)
        return Pipeline([("normalize", self.normalizer), ("head", estimator)])


def _one_blas_thread(small: bool):
    from threadpoolctl import threadpool_limits

    return threadpool_limits(1) if small else contextlib.nullcontext()


def _fold_path(head_type, options, X, y, scoring, n_classes, train, test, values) -> list[float]:
    """Held-out scores of one fold along ascending C values."""
    from sklearn import config_context
    from sklearn.exceptions import ConvergenceWarning

    X_train, y_train, X_test, y_test = X[train], y[train], X[test], y[test]
    scores, estimator = [], None
    with warnings.catch_warnings(), config_context(assume_finite=True):
        warnings.simplefilter("ignore", ConvergenceWarning)
        for C in values:
            if estimator is None or not head_type.warm_start:
                estimator = head_type.build(C, len(train), options)
            else:
                estimator.set_params(**head_type.strength(C, len(train)))
            estimator.fit(X_train, y_train)
            scores.append(score(y_test, estimator.predict(X_test), scoring, n_classes))
    return scores
