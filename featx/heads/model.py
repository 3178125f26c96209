"""A fitted head: `Head` (what users hold) around an estimator, and `ArrayModel` (the pickle-free estimator).

`ArrayModel` is the fitted pipeline as plain arrays (normalisation, a linear layer or the MLP, a link to
probabilities) and reproduces scikit-learn's arithmetic in numpy alone, so a head loaded from disk predicts what the
in-memory pipeline predicted without importing scikit-learn or scipy (a cached `featx predict` starts in well under
a second).
"""
from __future__ import annotations

import numpy as np

from ..errors import FeatxError
from .search import knn_votes, l2_normalize

# Config fields that decide what a row of a tap means; precision, dtype and versions may differ.
IDENTITY_FIELDS = ("backbone", "weights_sha256", "weights_match", "pooling", "token_pool", "transform")
FIELD_DEFAULTS = {"weights_match": "name"}  # what configs written before the field existed mean
ARRAYS = {"linear": ("coef", "intercept"), "mlp": ("w1", "b1", "w2", "b2"),
          "knn": ("rows", "labels", "n_neighbors", "temperature")}


def mlp_logits(X: np.ndarray, w1, b1, w2, b2) -> np.ndarray:
    """Class scores of the MLP head in eval mode (dropout is the identity)."""
    return np.maximum(X @ w1.T + b1, 0) @ w2.T + b2


def binary_scores(logits: np.ndarray) -> np.ndarray:
    """Two-class logits as one score per row (second less first), scikit-learn's decision_function shape."""
    return logits[:, 1] - logits[:, 0] if logits.ndim == 2 and logits.shape[1] == 2 else logits


def softmax(scores: np.ndarray) -> np.ndarray:
    """Row-wise softmax, in place, with scikit-learn's steps (sklearn.utils.extmath.softmax)."""
    scores -= scores.max(axis=1).reshape(-1, 1)
    np.exp(scores, out=scores)
    scores /= scores.sum(axis=1).reshape(-1, 1)
    return scores


def expit(x: np.ndarray) -> np.ndarray:
    """The logistic sigmoid 1 / (1 + exp(-x)) (scipy.special.expit's formula)."""
    return 1.0 / (1.0 + np.exp(-x))


class ArrayModel:
    """Normalisation + linear layer or MLP + link, from arrays only (see `from_pipeline`)."""

    def __init__(self, normalize: str, arrays: dict[str, np.ndarray], link: str | None, task: str, model: str):
        self.normalize = normalize
        self.arrays = arrays
        self.link = link
        self.task = task
        self.model = model

    @classmethod
    def from_pipeline(cls, pipeline, normalize: str, link: str | None, task: str, model: str) -> "ArrayModel":
        """The arrays of a fitted Pipeline([('normalize', ...), ('head', estimator)])."""
        normalizer, estimator = pipeline.named_steps["normalize"], pipeline.named_steps["head"]
        arrays = {"mean": normalizer.mean_, "scale": normalizer.scale_} if normalize == "standard" else {}
        if model == "mlp":
            arrays.update(w1=estimator.w1_, b1=estimator.b1_, w2=estimator.w2_, b2=estimator.b2_)
        elif model == "knn":
            arrays.update(rows=estimator.rows_, labels=estimator.labels_, n_neighbors=estimator.n_neighbors,
                          temperature=estimator.temperature)
        else:
            arrays.update(coef=estimator.coef_, intercept=np.asarray(estimator.intercept_))
        return cls(normalize, {k: np.asarray(v) for k, v in arrays.items()}, link, task, model)

    @property
    def n_features(self) -> int:
        return int(self.arrays[{"mlp": "w1", "knn": "rows"}.get(self.model, "coef")].shape[-1])

    def transform(self, X) -> np.ndarray:
        """The normalisation step, with StandardScaler's / Normalizer's own arithmetic."""
        X = np.array(X, dtype=np.float32 if np.asarray(X).dtype == np.float32 else np.float64)
        if self.normalize == "standard":
            X -= self.arrays["mean"].astype(X.dtype)
            X /= self.arrays["scale"].astype(X.dtype)
        elif self.normalize == "l2":
            X = l2_normalize(X)
        return X

    def decision_function(self, X) -> np.ndarray:
        """Class scores; one per row for two classes (the MLP and knn: the difference of their two columns), as
        scikit-learn gives."""
        scores = self._scores(X)
        return binary_scores(scores) if self.model in ("mlp", "knn") else scores

    def _scores(self, X) -> np.ndarray:
        X = self.transform(X)
        a = self.arrays
        if self.model == "mlp":
            return mlp_logits(X, a["w1"], a["b1"], a["w2"], a["b2"])
        if self.model == "knn":  # the normalised votes (featx.heads.knn: numpy and the search only)
            return knn_votes(X, a["rows"], a["labels"], int(a["labels"].max()) + 1, int(a["n_neighbors"]),
                             float(a["temperature"]))
        scores = X @ a["coef"].T + a["intercept"]
        return scores.reshape(-1) if scores.ndim > 1 and scores.shape[1] == 1 else scores

    def predict_proba(self, X) -> np.ndarray:
        scores = self._scores(X)
        if self.model == "knn":
            return scores
        if scores.ndim == 1:
            p = expit(scores)
            return np.stack([1 - p, p], axis=1)
        if self.link == "softmax":
            return softmax(scores)
        p = expit(scores)  # one-vs-rest, normalised; rows where every sigmoid underflows become uniform
        total = p.sum(axis=1)
        p[total == 0] = 1.0
        return p / np.where(total == 0, p.shape[1], total)[:, None]

    def predict(self, X) -> np.ndarray:
        """Class indices, or values for regression."""
        scores = self._scores(X)
        if self.task == "regression":
            return scores
        return (scores > 0).astype(np.int64) if scores.ndim == 1 else np.argmax(scores, axis=1)


class Head:
    """A fitted head, scikit-learn style: `predict` gives class names (or values), `predict_proba` columns follow
    `classes_`. Also holds what it was trained on: kind (--head), model ('linear' or 'mlp'), tap, the store config
    (to rebuild the extractor), C and metrics. `estimator` maps feature rows to class indices (or values): the
    fitted Pipeline, or an ArrayModel once loaded."""

    def __init__(self, estimator, *, kind: str, task: str, model: str, classes, n_features: int, tap: str,
                 normalize: str, link: str | None, C: float, config: dict | None, config_key: str | None = None,
                 metrics: dict | None = None, path=None):
        self.estimator = estimator
        self.kind = kind
        self.task = task
        self.model = model
        self.classes_ = None if classes is None else np.asarray(classes, dtype=object)
        self.n_features_in_ = n_features
        self.tap = tap
        self.normalize = normalize
        self.link = link
        self.C = C
        self.config = config
        self.config_key = config_key
        self.metrics = metrics or {}
        self.path = path

    def __repr__(self) -> str:
        what = f"{len(self.classes_)} classes" if self.classes_ is not None else "regression"
        C = "" if self.C is None else f", C={self.C:.3g}"
        return f"Head({self.kind}, {what}, tap={self.tap!r}{C}, path={self.path})"

    @property
    def taps(self) -> list[str]:
        """The taps whose rows the head reads: a dense probe's recorded `taps` (segment.json, when it fuses several
        maps), else its one tap."""
        return list((getattr(self, "segment", None) or {}).get("taps") or [self.tap])

    @property
    def has_proba(self) -> bool:
        return self.link is not None

    def _rows(self, X) -> np.ndarray:
        X = np.asarray(X)
        if X.ndim != 2 or X.shape[1] != self.n_features_in_:
            raise FeatxError(f"features of shape {X.shape} given to a head that expects (rows, {self.n_features_in_})")
        return X

    def decision_function(self, X) -> np.ndarray:
        return self.estimator.decision_function(self._rows(X))

    def predict_proba(self, X) -> np.ndarray:
        if not self.has_proba:
            raise FeatxError(f"a {self.kind} head gives no probabilities; use decision_function for scores")
        return self.estimator.predict_proba(self._rows(X))

    def predict(self, X) -> np.ndarray:
        out = self.estimator.predict(self._rows(X))
        return out if self.task == "regression" else self.classes_[out]

    def score(self, X, y) -> float:
        """Accuracy (classification) or R² (regression) on rows X with true labels / values y."""
        from sklearn.metrics import accuracy_score, r2_score

        pred = self.predict(X)
        if self.task == "regression":
            return float(r2_score(y, pred))
        return float(accuracy_score(np.asarray(y, dtype=object), pred))

    def check_rows(self, rows) -> None:
        """Refuse features that this head cannot read: another backbone, weights, pooling or transform, or width."""
        if self.config and rows.config:
            for name in IDENTITY_FIELDS:
                default = FIELD_DEFAULTS.get(name)
                ours, theirs = self.config.get(name, default), rows.config.get(name, default)
                if ours != theirs:
                    raise FeatxError(
                        f"{rows.path} was made with {name} {_short(theirs)} but the head with {_short(ours)}: its "
                        f"features do not fit this head (extract with the head's backbone and weights, or predict "
                        f"on the images)"
                    )
        if rows.n_features != self.n_features_in_:
            raise FeatxError(
                f"{rows.describe()} has {rows.n_features} features per row; the head expects {self.n_features_in_}"
            )


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
