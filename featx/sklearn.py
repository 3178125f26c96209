"""scikit-learn faces of featx: `Embedder`, a transformer from image paths to feature rows through a featx store.

    from sklearn.pipeline import make_pipeline
    from sklearn.linear_model import LogisticRegression
    model = make_pipeline(Embedder(backbone="resnet50", store="pets.h5"), LogisticRegression())
    model.fit(paths, labels)         # paths: image files; their rows are extracted once into pets.h5

The store is the cache: `transform` extracts only the images whose content the store lacks (`featx extract` with
retention 'add': the store only gains rows) and returns every image's row, so a GridSearchCV over the classifier
computes each image once. The heads' estimators (featx.heads.mlp.MLPHead, featx.heads.knn.KNNHead) are
scikit-learn estimators too.
"""
from __future__ import annotations

import numbers
import os
import re
from pathlib import Path

import numpy as np
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.utils.validation import check_is_fitted

from .choices import POOLINGS, PRECISIONS, WEIGHTS_MATCHES
from .errors import FeatxError

__all__ = ["Embedder"]
ROW_POOLINGS = tuple(p for p in POOLINGS if p != "none")  # one row per image


def default_store_folder() -> Path:
    """Where an Embedder without `store` caches its rows: $FEATX_CACHE, else $XDG_CACHE_HOME/featx, else
    ~/.cache/featx (one store per extractor setting, under embeddings/)."""
    base = os.environ.get("FEATX_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "featx")
    return Path(base) / "embeddings"


class Embedder(TransformerMixin, BaseEstimator):
    """Image paths -> float32 feature rows of `tap` of a frozen `backbone`, cached in the featx store `store`.

    backbone, weights, weights_match, tap (None: the backbone's penultimate node), pooling, image_size, precision:
    as `featx extract` (-b, -w, --weights-match, -l, --pooling, --image-size, --precision); batch_size, device,
    workers: how the missing images are computed. store: the .h5 cache (None: a store per setting under
    `default_store_folder()`). fit validates the parameters and learns nothing; transform(paths) returns
    (len(paths), features) rows in the order given, extracting only what the store lacks. An image that cannot be
    read or decoded is a FeatxError naming it.
    """

    def __init__(self, backbone="resnet50", weights="DEFAULT", tap=None, pooling="avg", image_size=None, store=None,
                 weights_match="name", precision="auto", batch_size=64, device="auto", workers=None):
        self.backbone = backbone
        self.weights = weights
        self.tap = tap
        self.pooling = pooling
        self.image_size = image_size
        self.store = store
        self.weights_match = weights_match
        self.precision = precision
        self.batch_size = batch_size
        self.device = device
        self.workers = workers

    def __sklearn_tags__(self):
        """Its input is image paths (strings), not a numeric 2-D array: scikit-learn's checks that feed numbers
        do not apply, and `requires_fit`: transform needs fit's checked parameters."""
        tags = super().__sklearn_tags__()
        tags.input_tags.two_d_array = False
        tags.input_tags.string = True
        tags.requires_fit = True
        return tags

    def fit(self, X=None, y=None):
        """Check the parameters (ValueError naming the first bad one); nothing is computed. Returns self."""
        def optional_int(value, least):
            return value is None or (isinstance(value, numbers.Integral) and not isinstance(value, bool)
                                     and value >= least)

        checks = [
            ("backbone", isinstance(self.backbone, str) and self.backbone != "", "a model name"),
            ("weights", isinstance(self.weights, (str, os.PathLike)), "a weights name or file"),
            ("tap", self.tap is None or (isinstance(self.tap, str) and self.tap != ""), "a tap name or None"),
            ("pooling", self.pooling in ROW_POOLINGS, f"one of {', '.join(ROW_POOLINGS)}"),
            ("image_size", optional_int(self.image_size, 8), "None or an integer >= 8"),
            ("store", self.store is None or isinstance(self.store, (str, os.PathLike)), "a .h5 path or None"),
            ("weights_match", self.weights_match in WEIGHTS_MATCHES, f"one of {', '.join(WEIGHTS_MATCHES)}"),
            ("batch_size", optional_int(self.batch_size, 1) and self.batch_size is not None, "a positive integer"),
            ("workers", optional_int(self.workers, 0), "None or an integer >= 0"),
            ("device", isinstance(self.device, str), "auto, cpu, cuda, cuda:N or mps"),
            ("precision", self.precision in PRECISIONS, f"one of {', '.join(PRECISIONS)}"),
        ]
        for name, ok, expected in checks:
            if not ok:
                raise ValueError(f"Embedder {name}={getattr(self, name)!r}: expected {expected}")
        self.store_ = Path(self.store) if self.store is not None else default_store_folder() / f"{self._slug()}.h5"
        return self

    def transform(self, X) -> np.ndarray:
        """(len(X), features) float32 rows of the images X (paths), extracting into the store what it lacks."""
        from .sources import content_key
        from .store import open_store

        check_is_fitted(self)
        paths = _paths(X)
        keys = []
        for path in paths:
            try:
                keys.append(content_key(path))
            except OSError as err:
                raise FeatxError(f"{path}: cannot read file ({err.strerror or err})") from None
        stored = self._stored_keys()
        missing = list(dict.fromkeys(p for p, k in zip(paths, keys) if stored is None or k not in stored))
        if missing:
            self._extract(missing)
        with open_store(self.store_) as store:
            tap = self.tap or store.config["taps"][0]
            rows = {key: i for i, key in enumerate(store.keys)}
            return store.features(tap, np.array([rows[k] for k in keys], dtype=np.int64))

    def _arguments(self, data) -> dict:
        from .extract_request import call_arguments

        return call_arguments(data, self.store_, backbone=self.backbone, weights=os.fspath(self.weights),
                              weights_match=self.weights_match, taps=[self.tap] if self.tap else None,
                              pooling=self.pooling, image_size=self.image_size, precision=self.precision,
                              batch_size=self.batch_size, device=self.device, workers=self.workers, retention="add")

    def _stored_keys(self) -> set | None:
        """The content keys the store holds when it was made with these parameters; None when it is missing or
        another call made it (then extract decides: it reuses the rows of the same extractor or refuses another)."""
        from .extract_request import describe
        from .sources import sha256_file
        from .store import open_store

        if not self.store_.exists():
            return None
        with open_store(self.store_) as store:
            recorded = store.config.get("request", {}).get("arguments")
            if recorded != describe(self._arguments(None)):
                return None
            if os.path.isfile(self.weights) and sha256_file(self.weights) != store.config.get("weights_sha256"):
                return None
            return set(store.keys)

    def _extract(self, files: list[str]) -> None:
        from .extraction import extract

        self.store_.parent.mkdir(parents=True, exist_ok=True)
        result = extract(**self._arguments(files[0] if len(files) == 1 else files))
        if result.failed:
            path, reason = result.failed[0]
            more = f" (and {len(result.failed) - 1} more)" if len(result.failed) > 1 else ""
            raise FeatxError(f"{path}: {reason}{more}")

    def _slug(self) -> str:
        """A file name for the default store of these parameters."""
        weights = os.path.basename(os.fspath(self.weights))
        parts = [self.backbone, weights, self.weights_match, self.tap or "default", self.pooling,
                 str(self.image_size or "default"), self.precision]
        return re.sub(r"[^A-Za-z0-9_.-]+", "_", "-".join(parts))


def _paths(X) -> list[str]:
    """Absolute image paths from a list, a 1-D array, or a one-column array, Series or DataFrame of paths."""
    values = np.asarray(X, dtype=object)
    if values.ndim == 2 and values.shape[1] == 1:
        values = values[:, 0]
    if values.ndim != 1:
        raise ValueError(f"Embedder takes a list of image paths, got an array of shape {values.shape}")
    bad = [v for v in values if not isinstance(v, (str, os.PathLike))]
    if bad:
        raise ValueError(f"Embedder takes image paths, got {type(bad[0]).__name__} {bad[0]!r}")
    return [os.path.abspath(os.fspath(v)) for v in values]
