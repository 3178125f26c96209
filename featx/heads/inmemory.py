"""Heads trained on rows held in memory: normalised once, cross-validated in parallel with joblib (one job per
fold), refit on all rows. Every fit starts from scratch, so a (C, fold) score does not depend on the values fitted
before it, and a fit that stops at its solver's iteration limit (a ConvergenceWarning) is recorded, not hidden."""
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

    # the decade pass is scored in one call: each call sends the rows to the fold workers, and scored one value at a
    # time (to stop past the peak) it cost more than the fits it skipped (flower_photos 2.3-2.8 s against 1.9 s,
    # 4,000 x 1280 rows 17.0 s against 16.5 s)
    stepwise = False

    def __init__(self, head_type, options, rows, train: np.ndarray, y: np.ndarray, n_classes: int, normalize: str,
                 chunk_rows: int, n_jobs: int | None):
        self.head_type, self.options, self.y, self.n_classes = head_type, options, y, n_classes
        self.normalizer, self.X = fit_normalizer(normalize, rows.read(train, chunk_rows))
        self.n_jobs = n_jobs
        self.folds: list = []
        self.scoring = "accuracy"
        self.converged = True  # of the last fit

    def set_folds(self, folds, scoring: str) -> None:
        """Use (train, test) position pairs from cv.make_folds for `score_grid`."""
        self.folds, self.scoring = folds, scoring

    def score_grid(self, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(scores, converged): (len(values), folds) held-out scores, and whether each fit converged."""
        from joblib import Parallel, delayed

        small = self.X.size * len(self.folds) < SMALL_WORK
        args = (self.head_type, self.options, self.X, self.y, self.scoring, self.n_classes)
        with _one_blas_thread(small):
            paths = Parallel(n_jobs=1 if small else self.n_jobs)(
                delayed(_fold_path)(*args, train, test, values) for train, test in self.folds
            )
        scores = np.array([[score for score, _ in path] for path in paths]).T
        converged = np.array([[ok for _, ok in path] for path in paths], dtype=bool).T
        return scores, converged

    def fit(self, C: float):
        """The head at C on all training rows, as Pipeline([('normalize', ...), ('head', estimator)]); sets
        `converged` to whether its solver converged."""
        from sklearn.pipeline import Pipeline

        with _one_blas_thread(self.X.size < SMALL_WORK):
            estimator = self.head_type.build(C, len(self.y), self.options)
            self.converged = _fit(estimator, self.X, self.y)
        return Pipeline([("normalize", self.normalizer), ("head", estimator)])


def _one_blas_thread(small: bool):
    from threadpoolctl import threadpool_limits

    return threadpool_limits(1) if small else contextlib.nullcontext()


def _fit(estimator, X, y) -> bool:
    """Fit `estimator`; False when its solver stopped at its iteration limit (a ConvergenceWarning)."""
    from sklearn import config_context
    from sklearn.exceptions import ConvergenceWarning

    with warnings.catch_warnings(record=True) as caught, config_context(assume_finite=True):
        warnings.simplefilter("always", ConvergenceWarning)
        estimator.fit(X, y)
    return not any(issubclass(w.category, ConvergenceWarning) for w in caught)


def _fold_path(head_type, options, X, y, scoring, n_classes, train, test, values) -> list[tuple[float, bool]]:
    """(held-out score, converged) of one fold at each C, every fit from scratch."""
    X_train, y_train, X_test, y_test = X[train], y[train], X[test], y[test]
    path = []
    for C in values:
        estimator = head_type.build(C, len(train), options)
        converged = _fit(estimator, X_train, y_train)
        path.append((score(y_test, estimator.predict(X_test), scoring, n_classes), converged))
    return path
