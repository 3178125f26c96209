"""Embeddings keyed by the image bytes' sha256, as in stores: an LRU in memory, optionally backed by a featx store.

`StoreBacking` keeps a store's writer lock for the server's lifetime. It answers from the store's rows and from
the segments this server committed, writes every new row as a segment (crash-safe, as in `featx extract`), and
seals them into the store at shutdown. A kill leaves the old store plus committed segments: the next `featx serve
--cache` or `featx extract` on that store picks them up.
"""
from __future__ import annotations

import concurrent.futures as cf
import contextlib
import threading
from collections import OrderedDict
from pathlib import Path

import h5py
import numpy as np

from ..errors import FeatxError
from ..options import OptionError
from ..retention import DataRows
from ..store import open_store
from ..writer import StoreWriter

Rows = dict  # {tap: np.ndarray row} of one image
UPLOAD_PREFIX = "uploads/"
UPLOADS_ROOT = "uploads"  # the data root of the rows a service adds to its cache store


class LRU:
    """A thread-safe least-recently-used map of at most `capacity` items."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._items: OrderedDict = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key):
        with self._lock:
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
            return value

    def put(self, key, value) -> None:
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)


class StoreBacking:
    """A featx store as the persistent cache of one extractor (its config must be the store's)."""

    def __init__(self, path: Path, config: dict, config_key: str):
        self.path = Path(path)
        self.taps = list(config["taps"])
        self._writer = StoreWriter(self.path, config, config_key).__enter__()
        self._files: dict[Path, h5py.File] = {}
        self._new: list[str] = []
        self._lock = threading.Lock()
        self._io = cf.ThreadPoolExecutor(max_workers=1, thread_name_prefix="featx-cache-io")
        self._pending: list[cf.Future] = []

    def __len__(self) -> int:
        return len(self._writer.available)

    def get(self, key: str) -> Rows | None:
        with self._lock:
            where = self._writer.available.get(key)
            if where is None:
                return None
            h5 = self._files.get(where.file)
            if h5 is None:
                h5 = self._files[where.file] = h5py.File(where.file, "r", locking=False)
            group = h5["features"] if where.file == self.path else h5
            return {tap: group[tap][where.row] for tap in self.taps}

    def add(self, keys: list[str], rows: dict[str, np.ndarray]) -> None:
        """Commit new rows as one segment, in the background; they are readable once written."""
        with self._lock:
            fresh = [i for i, key in enumerate(keys) if key not in self._writer.available and key not in self._new]
            self._new.extend(keys[i] for i in fresh)
        if fresh:
            batch = ([keys[i] for i in fresh], {tap: rows[tap][fresh] for tap in self.taps})
            self._pending.append(self._io.submit(self._commit, *batch))

    def _commit(self, keys, rows) -> None:
        with self._lock:
            self._writer.commit(keys, rows)

    def close(self) -> None:
        """Wait for the commits, seal old rows and new ones into the store, release the lock."""
        self._io.shutdown(wait=True)
        for future in self._pending:
            future.exception()  # a failed commit leaves its rows uncached; the sealed store is still complete
        for h5 in self._files.values():
            h5.close()
        try:
            if any(self._writer.parts.glob("seg-*.h5")):
                self._writer.seal(self._writer.plan(self._uploads(), "add"), self.taps)  # removes the parts folder
            else:
                with contextlib.suppress(OSError):
                    self._writer.parts.rmdir()  # nothing new: drop the lock folder, as sealing does
        finally:
            self._writer.__exit__(None, None, None)

    def _uploads(self) -> DataRows:
        """Every row in a segment (this run's, or a killed run's) as an unlabelled upload; the store's rows stay
        (retention 'add')."""
        new = [key for key, where in self._writer.available.items() if where.file != self.path]
        return DataRows(root=UPLOADS_ROOT, keys=new, paths=[UPLOAD_PREFIX + key for key in new], splits=[""] * len(new),
                        classes=[], labels=[-1] * len(new), targets=None, failed=[])


class EmbeddingCache:
    """Rows by (extractor key, image sha256): the LRU first, then the extractor's store, if it has one."""

    def __init__(self, capacity: int, metrics):
        self.memory = LRU(capacity)
        self.stores: dict[str, StoreBacking] = {}
        self.metrics = metrics

    def attach_store(self, path, extractor_key: str, config: dict) -> None:
        self.stores[extractor_key] = StoreBacking(Path(path), config, extractor_key)

    def get(self, extractor_key: str, key: str) -> Rows | None:
        rows = self.memory.get((extractor_key, key))
        if rows is not None:
            self.metrics.cache.labels("memory", "hit").inc()
            return rows
        store = self.stores.get(extractor_key)
        rows = store.get(key) if store is not None else None
        self.metrics.cache.labels("store" if store is not None else "memory", "hit" if rows is not None else "miss").inc()
        if rows is not None:
            self.memory.put((extractor_key, key), rows)
        return rows

    def put_batch(self, extractor_key: str, keys: list[str], rows: dict[str, np.ndarray]) -> None:
        for i, key in enumerate(keys):
            self.memory.put((extractor_key, key), {tap: value[i] for tap, value in rows.items()})
        store = self.stores.get(extractor_key)
        if store is not None:
            store.add(keys, rows)

    def close(self) -> None:
        for store in self.stores.values():
            store.close()


def match_store(path, extractors: dict[str, dict]) -> tuple[str, dict]:
    """(extractor key, config) that the store at `path` caches; a new store belongs to the only extractor."""
    path = Path(path)
    if not path.exists():
        if len(extractors) != 1:
            raise OptionError("{cache=}: no such store; the heads use {n} extractors, so the store must exist (made by "
                              "featx extract) to say which one it caches", cache=str(path), n=len(extractors))
        return next(iter(extractors.items()))
    with open_store(path) as store:
        if store.config_key in extractors:
            return store.config_key, extractors[store.config_key]
        raise OptionError("{cache=}: made with backbone {backbone} taps {taps}, a config no served head uses (extract "
                          "it with the head store's options)", cache=str(path), backbone=store.config.get("backbone"),
                          taps=",".join(store.config.get("taps", [])))
