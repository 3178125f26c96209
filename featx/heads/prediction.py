"""`predict`: a head applied to images (through the extractor rebuilt from its config, via a cache store) or
directly to the rows of a feature file (a featx store, or HDF5/NPZ with --x)."""
from __future__ import annotations

import contextlib
import csv
import os
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import FeatxError
from ..options import OptionError, OptionWarning
from .data import open_rows
from .model import Head
from .persistence import load_head

FEATURE_SUFFIXES = (".h5", ".hdf5", ".he5", ".npz")
HEAD_CACHE_BYTES = 1 << 30  # HEAD/cache/ keeps at most this many bytes of feature rows, dropping the oldest data first


@dataclass
class Predictions:
    """One prediction per row: `names` (image paths or row numbers), `predicted` (class names, or values for
    regression) and `scores` (rows x classes): probabilities when `probabilities`, else decision scores."""

    names: np.ndarray
    predicted: np.ndarray
    classes: list[str] | None
    scores: np.ndarray | None
    probabilities: bool
    failed: list[tuple[str, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.names)

    @property
    def score_name(self) -> str:
        return "probability" if self.probabilities else "score"

    def _top(self, i: int, top_k: int):
        order = np.argsort(-self.scores[i], kind="stable")[:top_k]
        return [(self.classes[j], float(self.scores[i, j])) for j in order]

    def records(self, top_k: int | None = None) -> list[dict]:
        """One dict per row: path, predicted, and per-class probabilities (or scores), or the `top_k` best."""
        _check_top_k(top_k)
        out = []
        for i, name in enumerate(self.names):
            record = {"path": str(name), "predicted": _plain(self.predicted[i])}
            if self.scores is not None and top_k:
                record["top_k"] = [{"class": c, self.score_name: s} for c, s in self._top(i, top_k)]
            elif self.scores is not None:
                record["probabilities" if self.probabilities else "scores"] = dict(
                    zip(self.classes, map(float, self.scores[i])))
            out.append(record)
        return out

    def write_csv(self, file, top_k: int | None = None) -> None:
        """CSV: path, predicted, then one column per class (p_<class> or score_<class>), or class_i, p_i pairs."""
        _check_top_k(top_k)
        prefix = "p" if self.probabilities else "score"
        writer = csv.writer(file, lineterminator="\n")
        header = ["path", "predicted"]
        if self.scores is not None and top_k:
            k = min(top_k, len(self.classes))
            header += [col for r in range(1, k + 1) for col in (f"class_{r}", f"{prefix}_{r}")]
        elif self.scores is not None:
            header += [f"{prefix}_{c}" for c in self.classes]
        writer.writerow(header)
        for i, name in enumerate(self.names):
            row = [name, _plain(self.predicted[i])]
            if self.scores is not None and top_k:
                row += [v for c, s in self._top(i, top_k) for v in (c, f"{s:.6g}")]
            elif self.scores is not None:
                row += [f"{s:.6g}" for s in self.scores[i]]
            writer.writerow(row)


def _check_top_k(top_k) -> None:
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise OptionError("{top_k=}: expected a positive integer", top_k=top_k)


def _plain(value):
    return float(value) if isinstance(value, (float, np.floating)) else str(value)


def is_feature_file(data) -> bool:
    """Whether DATA names a feature file (.h5/.hdf5/.npz) rather than images; a feature file goes alone."""
    if not isinstance(data, (list, tuple)):
        return Path(str(data)).suffix.lower() in FEATURE_SUFFIXES
    files = [one for one in data if is_feature_file(one)]
    if files and len(data) > 1:
        raise FeatxError(f"{files[0]}: a feature file is read alone; give it without other data")
    return bool(files)


def can_write_in(folder) -> bool:
    """Whether `folder` can be written: a writable folder, or one that can be created in the nearest existing
    folder above it."""
    folder = Path(folder).absolute()
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    return existing.is_dir() and os.access(existing, os.W_OK | os.X_OK)


@contextlib.contextmanager
def image_features(head: Head, data, store=None, weights=None, *, batch_size: int = 64, device: str = "auto",
                   workers: int | None = None, progress: bool = False, log=None):
    """Yield (feature store, the store rows of `data`, failed images) of the images `data` as the head's extractor
    computes them: in `store`, else in the head's cache HEAD/cache/, else (a read-only head folder) in a temporary
    store removed on exit, with a warning that says so (and no summary line of that store for `log`)."""
    if store is not None or head.path is None or can_write_in(Path(head.path) / "cache"):
        yield _extract(head, data, store, batch_size, device, workers, progress, log, weights)
        return
    warnings.warn(OptionWarning("{head} is read-only: the images' features are not cached (pass {store=$file} to "
                                "keep them)", head=head.path, file="FILE.h5"), stacklevel=3)
    with tempfile.TemporaryDirectory(prefix="featx-features-") as folder:
        yield _extract(head, data, Path(folder) / "features.h5", batch_size, device, workers, progress, None, weights)


def predict(head, data, *, store=None, weights=None, x: str | None = None, trust: bool = False,
            batch_size: int = 64, device: str = "auto", workers: int | None = None, chunk_rows: int = 65536,
            progress: bool = False, log=None) -> Predictions:
    """Apply `head` (a Head or a head folder; a model.joblib only with trust=True) to `data`.

    data is images (an ImageFolder, a CSV, a list, an image file, or a list of several of these: their features
    are extracted with the head's backbone, weights, tap, pooling and transform into the cache store `store`, by
    default HEAD_DIR/cache/, so repeated runs compute only new images; the cache only gains rows, HEAD/cache/ keeps
    at most HEAD_CACHE_BYTES of them, and a read-only head folder runs uncached, with a warning) or a feature file
    (a featx store made with the same extractor, or HDF5/NPZ with array `x`). `weights`: the head's weights file
    when it is no longer where the head recorded it (its sha256 must be the recorded one). Returns Predictions:
    one row per image (or feature row), with the images that failed to decode.
    """
    head = head if isinstance(head, Head) else load_head(head, trust=trust)
    if is_feature_file(data):
        return _apply_to_file(head, data, x, chunk_rows, None, [])
    with image_features(head, data, store, weights, batch_size=batch_size, device=device, workers=workers,
                        progress=progress, log=log) as (path, selected, failed):
        return _apply_to_file(head, path, x, chunk_rows, selected, failed)


def _apply_to_file(head: Head, path, x: str | None, chunk_rows: int, selected, failed) -> Predictions:
    """Predictions of `head` on the rows `selected` (None: every row) of a feature file."""
    with open_rows(path, head.tap if x is None else None, x) as rows:
        head.check_rows(rows)
        parts = [apply_head(head, block) for _, block in rows.iter_chunks(selected, chunk_rows)]
        names = rows.names if selected is None else rows.names[selected]
    predicted = np.concatenate([p for p, _ in parts]) if parts else np.empty(0)
    scores = np.concatenate([s for _, s in parts]) if parts and head.task != "regression" else None
    classes = None if head.classes_ is None else [str(c) for c in head.classes_]
    return Predictions(names, predicted, classes, scores, head.has_proba, failed)


def apply_head(head: Head, block: np.ndarray):
    """(predictions, per-class scores) of one block: probabilities, or decision scores (binary: -s, s)."""
    predicted = head.predict(block)
    if head.task == "regression":
        return predicted, None
    if head.has_proba:
        return predicted, head.predict_proba(block)
    scores = head.decision_function(block)
    return predicted, np.stack([-scores, scores], axis=1) if scores.ndim == 1 else scores


def _extract(head: Head, data, store, batch_size, device, workers, progress, log, weights=None):
    """Extract `data` with the head's extractor into the cache store; returns (store path, the store rows of
    `data`, failed images). The store only gains rows (retention 'add'); the head's own cache is bounded by
    HEAD_CACHE_BYTES. `log` gets the cache's summary line."""
    if not head.config:
        raise OptionError("this head was fitted on foreign features (no extractor config): predict takes a feature "
                          "file (.h5/.npz with {x}), not images")
    options = extractor_options(head.config, head.taps, weights)
    size_limit = None
    if store is None:
        if head.path is None:
            raise FeatxError("an unsaved head needs store= (a .h5 path for the images' features) to predict on images")
        store = Path(head.path) / "cache" / f"{_cache_name(head, options['weights'])}.h5"
        size_limit = HEAD_CACHE_BYTES
    result = extract_images(options, data, store, head.config, "the head was trained on features of", size_limit,
                            batch_size=batch_size, device=device, workers=workers, progress=progress, log=log)
    return result.store_path, result.rows, result.failed


def extractor_options(config: dict, tap: str | list[str], weights=None) -> dict:
    """`extract` keyword arguments that rebuild the extractor of a store `config` for one tap or a list of taps
    (weights: a moved weights file, checked against the recorded sha256 before any work)."""
    from ..extract_request import extract_options_from_config

    return {**extract_options_from_config(config, weights or ()), "taps": [tap] if isinstance(tap, str) else list(tap)}


def extract_images(options: dict, data, store, config: dict, owner: str, size_limit: int | None = None, *,
                   batch_size: int = 64, device: str = "auto", workers: int | None = None, progress: bool = False,
                   log=None):
    """Extract `data` into the cache store `store` with `options` (from extractor_options), keeping every row it
    held (retention 'add', bounded by `size_limit` bytes); returns the ExtractResult. When the store already holds
    every image (featx.extract_request.up_to_date), nothing is built and torch is not imported. The extracted store's
    weights must be those of `config` (`owner` names whose, in the message). `log` gets the cache's summary line."""
    from ..extract_request import call_arguments, up_to_date

    arguments = call_arguments(data, store, **options, batch_size=batch_size, device=device, workers=workers,
                               retention="add", size_limit=size_limit, progress=progress, log=log)
    result = up_to_date(arguments)
    if result is None:
        from ..extraction import extract

        result = extract(**arguments)
    _check_weights(config, owner, options["weights"], result.config.get("weights_sha256"))
    if log is not None:
        log(f"cache: {result.summary()}")
    return result


def _cache_name(head: Head, weights: str) -> str:
    """The name of the head's cache store. A store's identity includes the weights file's name, so a renamed
    weights file (-w) gets a cache of its own."""
    recorded = head.config.get("weights_path")
    if not recorded or os.path.basename(recorded) == os.path.basename(weights):
        return (head.config_key or "features")[:16]
    from ..store import config_fingerprint

    return config_fingerprint({"head": head.config_key, "weights": os.path.basename(weights)})[:16]


def _check_weights(config: dict, owner: str, weights: str, sha256: str | None) -> None:
    expected = config.get("weights_sha256")
    if sha256 != expected:
        raise FeatxError(
            f"weights {weights} have sha256 {str(sha256)[:16]}..., but {owner} weights with sha256 "
            f"{str(expected)[:16]}...: use the weights file the features were made with"
        )
