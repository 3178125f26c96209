"""A head on disk: a folder, written atomically, that holds the head without pickles.

    HEAD_DIR/head.json     what the head is: kind, task, classes, tap, normalisation, link, C, the store config
    HEAD_DIR/weights.npz   its arrays, read with allow_pickle=False: loading a head runs no code
    HEAD_DIR/metrics.json  the fit's metrics (plus the PNG plots)
    HEAD_DIR/model.joblib  optional (--joblib): the scikit-learn Pipeline, predicting class names (classes_ are the
                           names); a pickle, so it is only loaded when the caller trusts it
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from .. import __version__
from ..errors import FeatxError
from ..options import OptionError
from .model import ARRAYS, ArrayModel, Head

FORMAT = 1
HEAD_FILE = "head.json"
WEIGHTS_FILE = "weights.npz"
METRICS_FILE = "metrics.json"
JOBLIB_FILE = "model.joblib"
PICKLE_SUFFIXES = (".joblib", ".pkl", ".pickle")


def is_head_folder(path: Path) -> bool:
    try:
        return "featx_head" in json.loads((Path(path) / HEAD_FILE).read_text())
    except (OSError, ValueError, TypeError):
        return False


def check_output(folder: Path, overwrite: bool) -> None:
    """Refuse an output that is a file, a folder that is not a head, or a head without `overwrite`."""
    if not folder.exists():
        return
    if not folder.is_dir():
        raise OptionError("{output=}: is a file, expected a folder for the head", output=str(folder))
    if is_head_folder(folder):
        if not overwrite:
            raise OptionError("{output=}: holds a head already; pass {overwrite=True} to replace it",
                              output=str(folder))
    elif any(folder.iterdir()):
        raise OptionError("{output=}: is a folder that holds no featx head; choose another {output=DIR} (it is never "
                          "replaced)", output=str(folder))


@contextlib.contextmanager
def atomic_folder(folder, overwrite: bool = False):
    """Yield a temporary folder beside `folder`; when the block succeeds it replaces `folder` by a rename."""
    folder = Path(folder)
    check_output(folder, overwrite)
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        tmp.mkdir(parents=True)
    except OSError as err:
        raise OptionError("{output=}: cannot create a folder there ({reason})", output=str(folder),
                          reason=err.strerror) from err
    try:
        yield tmp
        check_output(folder, overwrite)
        old = tmp.with_name(tmp.name.replace(".tmp-", ".old-"))
        if folder.exists():
            os.replace(folder, old)
        os.replace(tmp, folder)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def save_head(head: Head, folder, joblib: bool = False) -> None:
    """Write head.json, weights.npz, metrics.json (and model.joblib) into an existing, empty folder."""
    folder = Path(folder)
    arrays = head.estimator if isinstance(head.estimator, ArrayModel) else ArrayModel.from_pipeline(
        head.estimator, head.normalize, head.link, head.task, head.model)
    meta = {
        "featx_head": FORMAT,
        "featx_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "kind": head.kind,
        "task": head.task,
        "model": head.model,
        "classes": None if head.classes_ is None else [str(c) for c in head.classes_],
        "n_features": head.n_features_in_,
        "tap": head.tap,
        "normalize": head.normalize,
        "link": head.link,
        "C": head.C,
        "config_key": head.config_key,
        "config": head.config,
        "joblib": JOBLIB_FILE if joblib else None,
    }
    (folder / HEAD_FILE).write_text(json.dumps(meta, indent=2))
    np.savez(folder / WEIGHTS_FILE, **arrays.arrays)
    (folder / METRICS_FILE).write_text(json.dumps(head.metrics, indent=2))
    if joblib:
        if isinstance(head.estimator, ArrayModel):
            raise FeatxError("a head loaded from its arrays has no scikit-learn pipeline to export with joblib")
        import joblib as joblib_module

        exported = head.estimator if head.classes_ is None else with_classes(head.estimator, head.classes_)
        joblib_module.dump(exported, folder / JOBLIB_FILE)


def with_classes(pipeline, classes):
    """A copy of a fitted classification Pipeline whose final estimator predicts `classes` (names, or indices)
    instead of what it was fitted on: classes_ is what predict returns and what predict_proba's columns follow."""
    import copy

    pipeline = copy.deepcopy(pipeline)
    pipeline.steps[-1][1].classes_ = np.asarray(classes)
    return pipeline


def load_head(path, trust: bool = False) -> Head:
    """Load a head folder from its arrays (runs no code), or, with trust=True, its model.joblib pickle. Returns the
    Head (`.predict`, `.predict_proba`, `.classes_`, `.metrics`)."""
    path = Path(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        return _load_pickle(path, trust)
    if path.name == HEAD_FILE:
        path = path.parent
    meta = _read_meta(path)
    try:
        with np.load(path / WEIGHTS_FILE, allow_pickle=False) as npz:
            arrays = {name: npz[name] for name in npz.files}
    except (OSError, ValueError) as err:
        raise FeatxError(f"{path / WEIGHTS_FILE}: unreadable head weights ({str(err).splitlines()[0][:100]})") from err
    needed = ARRAYS[meta["model"]] + (("mean", "scale") if meta["normalize"] == "standard" else ())
    missing = [name for name in needed if name not in arrays]
    if missing:
        raise FeatxError(f"{path / WEIGHTS_FILE}: damaged head, arrays {', '.join(missing)} are missing")
    estimator = ArrayModel(meta["normalize"], arrays, meta["link"], meta["task"], meta["model"])
    if estimator.n_features != meta["n_features"]:
        raise FeatxError(f"{path / WEIGHTS_FILE}: damaged head, arrays do not match {HEAD_FILE}")
    return _head(estimator, meta, path)


def _read_meta(folder: Path) -> dict:
    if not (folder / HEAD_FILE).is_file():
        raise FeatxError(f"{folder}: not a featx head folder (no {HEAD_FILE})")
    try:
        meta = json.loads((folder / HEAD_FILE).read_text())
        version = int(meta["featx_head"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise FeatxError(f"{folder / HEAD_FILE}: damaged head description ({err})") from err
    if version > FORMAT:
        raise FeatxError(f"{folder}: head format {version} is newer than this featx reads ({FORMAT}): upgrade featx")
    return meta


def _head(estimator, meta: dict, folder: Path) -> Head:
    metrics_file = folder / METRICS_FILE
    metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
    return Head(
        estimator, kind=meta["kind"], task=meta["task"], model=meta["model"], classes=meta["classes"],
        n_features=meta["n_features"], tap=meta["tap"], normalize=meta["normalize"], link=meta["link"], C=meta["C"],
        config=meta["config"], config_key=meta["config_key"], metrics=metrics, path=folder,
    )


def _load_pickle(path: Path, trust: bool) -> Head:
    if not trust:
        raise OptionError("{path} is a pickle: loading it can run arbitrary code; pass {trust=True} if you trust its "
                          "source, or give the head folder to load it from its arrays", path=path)
    if not path.is_file():
        raise FeatxError(f"{path}: no such file")
    import joblib

    meta = _read_meta(path.parent)
    pipeline = joblib.load(path)
    if meta["classes"] is not None:  # the export predicts names; a Head's estimator gives class indices
        pipeline = with_classes(pipeline, np.arange(len(meta["classes"])))
    return _head(pipeline, meta, path.parent)
