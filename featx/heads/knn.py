"""The k-NN head: weighted k nearest neighbours by cosine similarity, the evaluation DINO-style papers report.

Each of a row's k most similar training rows (L2-normalised, exact search: featx/heads/search.py) votes for its
class with weight exp(similarity / temperature); the votes, normalised to sum to one, are the class probabilities
(DINO's `knn_classifier`, k=20 and T=0.07 by default). scikit-learn's KNeighborsClassifier weighs by distance or
uniformly, not by exp(cos / T), hence this estimator. The fitted head is its training rows and their labels, so it
saves as arrays and predicts in numpy.
"""
from __future__ import annotations

import numbers

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data

from . import search
from .search import knn_votes
from .model import binary_scores

DEFAULT_NEIGHBORS = 20
DEFAULT_TEMPERATURE = 0.07


class KNNHead(ClassifierMixin, BaseEstimator):
    """Weighted k-NN classifier on cosine similarity: n_neighbors (k) and temperature (T) as in DINO's evaluation."""

    def __init__(self, n_neighbors=DEFAULT_NEIGHBORS, temperature=DEFAULT_TEMPERATURE):
        self.n_neighbors = n_neighbors
        self.temperature = temperature

    def fit(self, X, y):
        if not isinstance(self.n_neighbors, numbers.Integral) or isinstance(self.n_neighbors, bool) \
                or self.n_neighbors < 1:
            raise ValueError(f"n_neighbors={self.n_neighbors!r}: expected a positive integer")
        if not isinstance(self.temperature, numbers.Real) or not 0 < self.temperature < np.inf:
            raise ValueError(f"temperature={self.temperature!r}: expected a positive number")
        X, y = validate_data(self, X, y, dtype=np.float32)
        check_classification_targets(y)
        self.classes_, labels = np.unique(y, return_inverse=True)
        self.rows_ = search.normalized(X)
        self.labels_ = labels.astype(np.int64)
        return self

    def predict_proba(self, X) -> np.ndarray:
        check_is_fitted(self)
        X = validate_data(self, X, dtype=np.float32, reset=False)
        return knn_votes(X, self.rows_, self.labels_, len(self.classes_), self.n_neighbors, self.temperature)

    def decision_function(self, X) -> np.ndarray:
        """The votes (rows, classes); for two classes one score per row, the second's vote less the first's."""
        return binary_scores(self.predict_proba(X))

    def predict(self, X) -> np.ndarray:
        best = np.argmax(self.predict_proba(X), axis=1)
        return self.classes_[best]
