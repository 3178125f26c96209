"""The HDF5 store, schema version 1: writing a complete store atomically and reading one back.

Layout (row i of every per-item dataset is the same image)::

    /            attrs featx_schema=1, featx_version, created, config_key, config (JSON text)
    /items/key   (N,) S64   sha256 of the image file's bytes
    /items/path  (N,) utf-8 path relative to the data root
    /items/label (N,) int64 class index, -1 unlabelled   (or /items/target (N,) float64 for regression)
    /items/split (N,) utf-8 train / val / test, '' when the source has no splits
    /classes     (C,) utf-8
    /features/<tap>  (N, D) float32|float16, chunked by rows  (or (N, C, H, W) with pooling 'none')
    /failed/path, /failed/reason  (F,) utf-8

No pickles: strings are HDF5 string types, the config is JSON text. Any HDF5 reader understands it.
"""
from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from pathlib import Path

import h5py
import numpy as np

from . import __version__
from .errors import FeatxError

SCHEMA_VERSION = 1
UTF8 = h5py.string_dtype("utf-8")
KEY_DTYPE = "S64"
TARGET_CHUNK_BYTES = 1 << 20


def row_chunks(shape: tuple[int, ...], itemsize: int) -> tuple[int, ...]:
    """HDF5 chunk shape for a per-item dataset: whole rows, about 1 MiB per chunk."""
    row_bytes = max(1, int(np.prod(shape[1:], dtype=np.int64)) * itemsize)
    rows = int(max(1, min(max(shape[0], 1), TARGET_CHUNK_BYTES // row_bytes)))
    return (rows, *shape[1:])


def fsync_path(path: Path) -> None:
    """Flush a file (or a directory entry) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish(tmp: Path, final: Path) -> None:
    """Atomically move a complete file into place and make the rename durable."""
    fsync_path(tmp)
    os.replace(tmp, final)
    fsync_path(final.parent)


def _write_strings(group: h5py.Group, name: str, values) -> None:
    group.create_dataset(name, data=np.array([str(v) for v in values], dtype=object), dtype=UTF8)


def create_items(
    h5: h5py.File, *, keys, paths, splits, labels=None, targets=None, classes=(), failed=()
) -> None:
    """Write /items, /classes and /failed into an open, empty file."""
    items = h5.create_group("items")
    items.create_dataset("key", data=np.asarray(keys, dtype=KEY_DTYPE))
    _write_strings(items, "path", paths)
    _write_strings(items, "split", splits)
    if targets is not None:
        items.create_dataset("target", data=np.asarray(targets, dtype=np.float64))
    else:
        items.create_dataset("label", data=np.asarray(labels, dtype=np.int64))
    _write_strings(h5, "classes", classes)
    fail = h5.create_group("failed")
    _write_strings(fail, "path", [p for p, _ in failed])
    _write_strings(fail, "reason", [r for _, r in failed])


def create_features(h5: h5py.File, tap: str, shape: tuple[int, ...], dtype) -> h5py.Dataset:
    """An empty /features/<tap> dataset chunked by rows."""
    dtype = np.dtype(dtype)
    return h5.require_group("features").create_dataset(
        tap, shape=shape, dtype=dtype, chunks=row_chunks(shape, dtype.itemsize) if shape[0] else None
    )


def set_root_attrs(h5: h5py.File, config: dict, config_key: str) -> None:
    h5.attrs["featx_schema"] = SCHEMA_VERSION
    h5.attrs["featx_version"] = __version__
    h5.attrs["created"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    h5.attrs["config_key"] = config_key
    h5.attrs["config"] = json.dumps(config, sort_keys=True)


def write_store(
    path,
    *,
    config: dict,
    keys,
    paths,
    labels=None,
    splits=None,
    classes=(),
    features: dict,
    targets=None,
    failed=(),
    config_key: str | None = None,
) -> Path:
    """Write a complete schema-v1 store in one go (temp file + atomic rename). Returns the path."""
    path = Path(path)
    n = len(keys)
    splits = [""] * n if splits is None else splits
    labels = [-1] * n if labels is None and targets is None else labels
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with h5py.File(tmp, "w") as h5:
            set_root_attrs(h5, config, config_key or config_fingerprint(config))
            create_items(h5, keys=keys, paths=paths, splits=splits, labels=labels, targets=targets,
                         classes=classes, failed=failed)
            for tap, arr in features.items():
                arr = np.asarray(arr)
                create_features(h5, tap, arr.shape, arr.dtype)[...] = arr
        publish(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def config_fingerprint(config: dict) -> str:
    """sha256 of the canonical JSON of a config: the identity of how rows were computed."""
    import hashlib

    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()


def _strings(ds) -> np.ndarray:
    return np.array([v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in ds[...]], dtype=object)


class Store:
    """A featx store opened read-only. Metadata is loaded eagerly; features are read on demand."""

    def __init__(self, path: Path, h5: h5py.File):
        self.path = path
        self._h5 = h5
        try:
            self.config: dict = json.loads(h5.attrs.get("config", "{}"))
            self.config_key: str = str(h5.attrs.get("config_key", ""))
            items = h5["items"]
            self.keys = np.array([k.decode("ascii") for k in items["key"][...]], dtype=object)
            self.paths = _strings(items["path"])
            self.splits = _strings(items["split"]) if "split" in items else np.full(len(self.keys), "", dtype=object)
            self.targets = items["target"][...].astype(np.float64) if "target" in items else None
            if "label" in items:
                self.labels = items["label"][...].astype(np.int64)
            else:
                self.labels = np.full(len(self.keys), -1, dtype=np.int64)
            self.classes = list(_strings(h5["classes"])) if "classes" in h5 else []
            self.taps = list(h5["features"].keys()) if "features" in h5 else []
            self.failed = (
                list(zip(_strings(h5["failed/path"]), _strings(h5["failed/reason"]))) if "failed" in h5 else []
            )
        except (KeyError, ValueError, OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise FeatxError(f"{path}: damaged featx store ({err})") from err
        for tap in self.taps:
            if h5["features"][tap].shape[0] != len(self.keys):
                raise FeatxError(f"{path}: damaged featx store (/features/{tap} has {h5['features'][tap].shape[0]} rows, /items/key has {len(self.keys)})")

    def __len__(self) -> int:
        return len(self.keys)

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._h5.close()

    def _dataset(self, tap: str) -> h5py.Dataset:
        if tap not in self.taps:
            raise FeatxError(f"tap {tap!r} is not in {self.path}: it holds {', '.join(self.taps) or 'no features'}")
        return self._h5["features"][tap]

    def feature_shape(self, tap: str) -> tuple[int, ...]:
        """Per-row shape of a tap's features."""
        return tuple(self._dataset(tap).shape[1:])

    def feature_dtype(self, tap: str) -> np.dtype:
        return self._dataset(tap).dtype

    def features(self, tap: str, rows=None) -> np.ndarray:
        """Rows of a tap as float32: all of them, a slice, or an index array (any order, repeats allowed)."""
        ds = self._dataset(tap)
        if rows is None:
            data = ds[...]
        elif isinstance(rows, slice):
            data = ds[rows]
        else:
            rows = np.asarray(rows)
            if rows.dtype == bool:
                rows = np.flatnonzero(rows)
            data = read_rows(ds, rows)
        return data.astype(np.float32, copy=False)

    def iter_features(self, tap: str, chunk_rows: int = 65536):
        """Yield (start, float32 array) over a tap in row chunks, for data larger than memory."""
        ds = self._dataset(tap)
        for start in range(0, ds.shape[0], chunk_rows):
            yield start, ds[start : start + chunk_rows].astype(np.float32, copy=False)

    def summary(self) -> dict:
        """What `featx info` shows: counts, classes, splits, taps, failures, size, config."""
        labelled = self.labels[self.labels >= 0]
        split_names, split_counts = np.unique(self.splits.astype(str), return_counts=True)
        return {
            "path": str(self.path),
            "schema": int(self._h5.attrs.get("featx_schema", 0)),
            "featx_version": str(self._h5.attrs.get("featx_version", "")),
            "created": str(self._h5.attrs.get("created", "")),
            "items": len(self),
            "classes": {c: int((labelled == i).sum()) for i, c in enumerate(self.classes)},
            "task": "regression" if self.targets is not None else ("classification" if len(labelled) else "unlabelled"),
            "splits": {str(s) or "(none)": int(c) for s, c in zip(split_names, split_counts)},
            "taps": {
                t: {"shape": list(self.feature_shape(t)), "dtype": str(self.feature_dtype(t))} for t in self.taps
            },
            "failed": len(self.failed),
            "bytes": self.path.stat().st_size,
            "config_key": self.config_key,
            "config": self.config,
        }


def read_rows(ds: h5py.Dataset, rows: np.ndarray) -> np.ndarray:
    """Read arbitrary rows of a dataset: one contiguous read of their span when dense, else per sorted unique row."""
    if rows.size == 0:
        return np.empty((0, *ds.shape[1:]), dtype=ds.dtype)
    unique, inverse = np.unique(rows, return_inverse=True)
    lo, hi = int(unique[0]), int(unique[-1]) + 1
    if hi - lo <= 4 * unique.size:
        block = ds[lo:hi][unique - lo]
    else:
        block = ds[unique]
    return block[inverse]


def open_store(path) -> Store:
    """Open a featx store read-only; a one-line FeatxError when it is missing, damaged, foreign or newer."""
    path = Path(path)
    if not path.exists():
        raise FeatxError(f"{path}: no such store")
    if path.is_dir():
        raise FeatxError(f"{path}: is a folder, expected a featx .h5 store")
    try:
        h5 = h5py.File(path, "r", locking=False)
    except OSError as err:
        raise FeatxError(f"{path}: not a readable HDF5 file ({str(err).splitlines()[0][:120]})") from err
    try:
        schema = h5.attrs.get("featx_schema")
        if schema is None or "items" not in h5:
            raise FeatxError(f"{path}: not a featx store (no featx_schema attribute; for other HDF5/NPZ files use --x/--y)")
        if int(schema) > SCHEMA_VERSION:
            raise FeatxError(
                f"{path}: store schema {int(schema)} is newer than this featx understands ({SCHEMA_VERSION}): upgrade featx"
            )
        return Store(path, h5)
    except FeatxError:
        h5.close()
        raise
    except Exception as err:  # h5py raises many types on damaged files
        h5.close()
        raise FeatxError(f"{path}: damaged featx store ({type(err).__name__}: {str(err).splitlines()[0][:120] if str(err) else ''})") from err
