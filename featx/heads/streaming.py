"""Heads trained by streaming the store: chunks of rows go through `partial_fit`, so stores larger than memory train.

Passes over the training rows: one fits the normaliser (and finds NaN/inf rows); cross-validation then trains one
model per (C, fold) for `epochs` shuffled passes and scores each on its held-out fold in one more pass; the final
model takes `epochs` passes over all training rows.

Memory: a chunk is at most `--chunk-rows` rows and at most data.CHUNK_BYTES of float32 rows, whatever the rows'
width. The rows in memory are a few chunks at any time (the chunk as read, normalised in place, and one fold's copy
of it), so the peak is the process itself (about 0.3 GB), the store's per-row metadata (paths, keys, labels,
splits: about 300 bytes a row) and a few CHUNK_BYTES: peak RSS 512 MB at 100,000 rows and 766 MB at 1,000,000 rows
of 1280 features (benchmarks/scale_heads.py).
"""
from __future__ import annotations

import dataclasses

import numpy as np

from .cv import confusion_score
from .data import Rows, nonfinite_error
from .class_weights import balanced_weights
from .estimators import make_normalizer, transform_in_place

DEFAULT_EPOCHS = 5


class StreamingFit:
    """Streamed training of one head type on store rows `train` (sorted) with class indices `y`."""

    stepwise = False  # each score_grid call makes passes over the store: the decade pass is scored in one call

    def __init__(self, head_type, options, rows: Rows, train: np.ndarray, y: np.ndarray, n_classes: int,
                 normalize: str, chunk_rows: int, n_jobs: int | None):
        if options.class_weight == "balanced":  # partial_fit takes class weights only as a dict
            options = dataclasses.replace(options, class_weight=balanced_weights(y, n_classes))
        self.head_type, self.options, self.rows = head_type, options, rows
        self.train, self.y, self.classes = train, y, np.arange(n_classes)
        self.chunk_rows, self.n_jobs = chunk_rows, n_jobs
        self.epochs = options.epochs or DEFAULT_EPOCHS
        self.normalizer = self._fit_normalizer(make_normalizer(normalize))
        self.fold_of: np.ndarray | None = None
        self.converged = True  # a fixed number of epochs: there is no convergence criterion to miss
        self.scoring = "accuracy"

    def _fit_normalizer(self, normalizer):
        """One pass: fit the normaliser (stateless ones on a zero row) and refuse NaN/inf rows, all counted."""
        bad = []
        if not hasattr(normalizer, "partial_fit"):
            normalizer.fit(np.zeros((1, self.rows.n_features), dtype=np.float32))
        for index, block in self.rows.iter_chunks(self.train, self.chunk_rows, check=False):
            finite = np.isfinite(block).all(axis=1)
            bad.append(index[~finite])
            if hasattr(normalizer, "partial_fit") and finite.any():
                normalizer.partial_fit(block[finite])
        bad = np.concatenate(bad) if bad else np.empty(0, dtype=np.int64)
        if bad.size:
            raise nonfinite_error(self.rows, bad)
        return normalizer

    def set_folds(self, folds, scoring: str) -> None:
        """Use (train, test) position pairs from cv.make_folds for `score_grid`."""
        self.fold_of = np.empty(len(self.train), dtype=np.int64)
        for f, (_, test) in enumerate(folds):
            self.fold_of[test] = f
        self.scoring = scoring

    def _chunks(self, epoch: int | None):
        """(positions in `train`, normalised block) per chunk; shuffled differently in every epoch."""
        seed = None if epoch is None else self.options.seed + epoch
        for index, block in self.rows.iter_chunks(self.train, self.chunk_rows, seed=seed, check=False):
            yield np.searchsorted(self.train, index), transform_in_place(self.normalizer, block)

    def _update(self, model, X, y) -> None:
        if len(y):
            model.partial_fit(X, y, classes=self.classes)

    def score_grid(self, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(scores, converged): (len(values), folds) held-out scores, training every (C, fold) model in the same
        passes (the C values of a fold in threads: SGD's inner loop releases the GIL), and all True (a fixed
        number of epochs)."""
        from joblib import Parallel, delayed

        n_folds = int(self.fold_of.max()) + 1
        sizes = np.bincount(self.fold_of, minlength=n_folds)
        models = [[self.head_type.build(C, len(self.train) - sizes[f], self.options) for f in range(n_folds)]
                  for C in values]
        with Parallel(n_jobs=self.n_jobs, backend="threading") as parallel:
            for epoch in range(self.epochs):
                for pos, X in self._chunks(epoch):
                    y, fold = self.y[pos], self.fold_of[pos]
                    for f in range(n_folds):  # one fold's copy of the chunk at a time
                        keep = fold != f
                        X_fold, y_fold = X[keep], y[keep]
                        parallel(delayed(self._update)(per_fold[f], X_fold, y_fold) for per_fold in models)
                        del X_fold, y_fold
        k = len(self.classes)
        confusion = np.zeros((len(values), n_folds, k, k), dtype=np.int64)
        for pos, X in self._chunks(None):
            y, fold = self.y[pos], self.fold_of[pos]
            for f in range(n_folds):
                held = fold == f
                if held.any():
                    X_held, y_held = X[held], y[held]
                    for g, per_fold in enumerate(models):
                        np.add.at(confusion[g, f], (y_held, per_fold[f].predict(X_held)), 1)
        scores = np.array([[confusion_score(confusion[g, f], self.scoring) for f in range(n_folds)]
                           for g in range(len(values))])
        return scores, np.ones(scores.shape, dtype=bool)

    def fit(self, C: float):
        """The final model at C on all training rows, as Pipeline([('normalize', ...), ('head', model)])."""
        from sklearn.pipeline import Pipeline

        model = self.head_type.build(C, len(self.train), self.options)
        for epoch in range(self.epochs):
            for pos, X in self._chunks(epoch):
                self._update(model, X, self.y[pos])
        return Pipeline([("normalize", self.normalizer), ("head", model)])
