"""Content keys, each file read at most once: the stat index.

A row's key is the sha256 of its file's bytes (featx.sources.content_key). Reading every byte of every file on
every run costs what the data weighs, so, as git's index does, a store keeps with each row the stat of the file its
key was read from (`STAT_FIELDS`: size, mtime_ns, ctime_ns, inode, device, and when it was read) in `/items/stat`,
with the machine it was read on. A later run trusts the key of a file whose stat is unchanged and reads only the
others; `rehash=True` (`featx extract --rehash`) reads every file.

An index is ignored (its files are read again) when it comes from another machine, does not have one entry per row
(rows added by another tool), or belongs to other data (entries are looked up by data root and path). An entry is
not trusted when the file's mtime or ctime lies within `RACY_NS` of the moment it was read ("racily clean", as git
says): a write in the same timestamp tick would leave the stat unchanged. The risk that remains: a file whose bytes
are replaced while its size, mtime_ns, ctime_ns, inode and device all stay the same keeps its old key (ctime cannot
be set from user space, so this takes a clock set back, a file system that does not keep ctime, or a tool that
rewrites a block device under the file system); `--rehash` reads every byte.

A run reads each file at most once: `featx.extract_request.check` keys the data, and the real run (`featx.extraction`) takes
those keys over (its `checked` argument).
"""
from __future__ import annotations

import concurrent.futures as cf
import os
import socket
import time
from itertools import chain, repeat
from operator import attrgetter
from typing import NamedTuple

import numpy as np

from .gcpause import without_gc
from .sources import content_key

STAT_FIELDS = ("size", "mtime_ns", "ctime_ns", "ino", "dev", "read_ns")
RACY_NS = 2_000_000_000  # FAT keeps mtimes to 2 s; coarser clocks are rarer still
HASH_THREADS = 4  # hashing releases the GIL
NO_STAT = np.zeros(len(STAT_FIELDS), dtype=np.int64)
_STAT_FIELDS_OF = attrgetter("st_size", "st_mtime_ns", "st_ctime_ns", "st_ino", "st_dev")  # of an os.stat_result


def host_id() -> str:
    """This machine: its machine-id when it has one, else its host name (an index from elsewhere is ignored)."""
    for path in ("/etc/machine-id", "/var/lib/dbus/machine-id"):
        try:
            with open(path, encoding="ascii") as f:
                value = f.read().strip()
            if value:
                return value
        except (OSError, ValueError):
            continue
    return socket.gethostname()


def file_stat(path: str) -> tuple | None:
    """(size, mtime_ns, ctime_ns, inode, device) of a file, following links; None when it cannot be examined."""
    try:
        return _STAT_FIELDS_OF(os.stat(path))
    except (OSError, ValueError):
        return None


class StatIndex:
    """Trusted keys of a store's rows and of its failures that have one, by (data root, path), from its
    `/items/stat` and `/failed/stat` (see the module docstring)."""

    def __init__(self, roots, row_roots, paths, keys, stats: np.ndarray | None, host: str | None,
                 failures=None):
        """`failures`: (failed_roots, paths, keys, stats) of the store's failures, entries without a key ignored."""
        self._roots, self._n_rows = list(roots), len(keys)
        self._trusted: np.ndarray | None = None  # the entries that are trusted; None: the index is ignored
        self._entries: dict[str, dict[str, int]] = {}  # root -> path -> entry, built when a look-up needs it
        f_roots, f_paths, f_keys, f_stats = failures if failures is not None else ([], [], [], None)
        self._row_roots = np.concatenate([np.asarray(row_roots, dtype=np.int64), np.asarray(f_roots, dtype=np.int64)])
        self._paths = np.concatenate([np.asarray(paths, dtype=object), np.asarray(f_paths, dtype=object)])
        self._keys = np.concatenate([np.asarray(keys, dtype=object), np.asarray(f_keys, dtype=object)])
        if stats is None or host != host_id() or stats.shape != (len(keys), len(STAT_FIELDS)):
            return
        if f_stats is None or np.shape(f_stats) != (len(f_keys), len(STAT_FIELDS)):
            f_stats = np.zeros((len(f_keys), len(STAT_FIELDS)), dtype=np.int64)
        self._stats = np.concatenate([stats, f_stats])
        self._trusted = trusted_later(self._stats) & (self._keys != "")

    @classmethod
    def of_store(cls, store) -> "StatIndex":
        """The index of a featx.store.Store (empty when it has none)."""
        failures = (store.failed_roots, [path for path, _ in store.failed], store.failed_keys, store.failed_stats)
        return cls(store.roots, store.row_roots, store.paths, store.keys, store.file_stats, store.file_stats_host,
                   failures)

    def __len__(self) -> int:
        return sum(len(self._by_path(root)) for root in set(self._roots)) if self._trusted is not None else 0

    def keys(self, root: str, paths: list[str], stats: np.ndarray) -> list[str | None]:
        """The recorded key of each of `paths` under `root` whose stat (first 5 STAT_FIELDS) is the recorded one,
        else None."""
        n = len(paths)
        if self._trusted is None:
            return [None] * n
        entries = self._in_order(root, paths)
        if entries is None:  # the data differs from the store's entries of it: look each path up
            by_path = self._by_path(root)
            entries = np.fromiter(map(by_path.get, paths, repeat(-1)), dtype=np.int64, count=n)
        found = entries >= 0
        if found.any():
            at = entries[found]
            found[found] = self._trusted[at] & (self._stats[at, :5] == stats[found, :5]).all(axis=1)
        recorded = [str(key) for key in self._keys[entries[found]].tolist()]
        if len(recorded) == n:
            return recorded
        keys: list[str | None] = [None] * n
        for i, key in zip(np.flatnonzero(found).tolist(), recorded):
            keys[i] = key
        return keys

    def _in_order(self, root: str, paths: list[str]) -> np.ndarray | None:
        """The entry of each of `paths` when the store's entries of data `root` are exactly these paths: its rows in
        their order, with its failures among them where the data has them; else None."""
        rows, failures = self._entries_of(root)
        n = len(paths)
        if len(rows) + len(failures) != n:
            return None
        entries = rows
        if len(failures):
            where = dict(zip(self._paths[failures].tolist(), failures.tolist()))
            entries = np.fromiter(map(where.get, paths, repeat(-1)), dtype=np.int64, count=n)
            failing = entries >= 0
            if int(failing.sum()) != len(failures):
                return None
            entries[~failing] = rows
        return entries if (self._paths[entries] == np.asarray(paths, dtype=object)).all() else None

    def _entries_of(self, root: str) -> tuple[np.ndarray, np.ndarray]:
        """The store's rows of data `root`, in its order, and its failures' entries."""
        codes = [r for r, name in enumerate(self._roots) if name == root]
        if not codes:
            return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int64)
        entries = np.flatnonzero(np.isin(self._row_roots, codes))
        split = np.searchsorted(entries, self._n_rows)
        return entries[:split], entries[split:]

    def _by_path(self, root: str) -> dict[str, int]:
        """The trusted entries of data `root` by path."""
        if root not in self._entries:
            entries = np.concatenate(self._entries_of(root))
            entries = entries[self._trusted[entries]]
            self._entries[root] = dict(zip(map(str, self._paths[entries].tolist()), entries.tolist()))
        return self._entries[root]


def trusted_later(stats: np.ndarray) -> np.ndarray:
    """Which stat rows a later run would trust: recorded, and not racily clean."""
    return (stats[:, 5] > 0) & (np.maximum(stats[:, 1], stats[:, 2]) < stats[:, 5] - RACY_NS)


class FileKeys(NamedTuple):
    """Content keys of a source's items (None: unreadable), the stat row of each (NO_STAT: not to be recorded),
    how many files were read, and how many of those a later run would trust if the store recorded them."""

    keys: list[str | None]
    stats: np.ndarray
    n_read: int
    n_gained: int = 0

    @property
    def worth_recording(self) -> bool:
        """Whether rewriting the store's stat index (a seal that changes no row) spares later runs enough reading:
        one file in a hundred, or a thousand files."""
        return self.n_gained > 0 and self.n_gained >= min(1000, max(1, len(self.keys) // 100))


@without_gc
def file_keys(source, root: str, index: StatIndex | None = None, rehash: bool = False,
              progress: bool = False) -> FileKeys:
    """The content key of every item of `source` (a featx.sources.Source of data `root`): trusted from `index`
    where the file's stat is unchanged, read (in threads) otherwise; every file when `rehash`."""
    n = len(source.items)
    keys: list[str | None] = [None] * n
    stats = np.zeros((n, len(STAT_FIELDS)), dtype=np.int64)
    now = time.time_ns()
    stats[:, :5], readable = file_stats([item.path for item in source.items])
    if index is not None and not rehash:
        keys = index.keys(root, [item.relpath for item in source.items], stats)
    trusted = readable & np.fromiter((key is not None for key in keys), dtype=bool, count=n)
    stats[trusted, 5] = now
    to_read = np.flatnonzero(~trusted).tolist()
    if not to_read:
        return FileKeys(keys, stats, 0, 0)

    def read(i: int):
        path = source.items[i].path
        before = file_stat(path)
        read_ns = time.time_ns()
        try:
            key = content_key(path)
        except OSError:
            return i, None, None, read_ns
        after = file_stat(path)
        return i, key, before if before is not None and before == after else None, read_ns

    from tqdm import tqdm

    with cf.ThreadPoolExecutor(max_workers=HASH_THREADS) as pool:
        done = pool.map(read, to_read, chunksize=64)
        for i, key, stat, read_ns in tqdm(done, total=len(to_read), desc="hashing", unit="file", leave=False,
                                          disable=None if progress and to_read else True):
            keys[i] = key
            if stat is not None:
                stats[i] = (*stat, read_ns)
    gained = int(trusted_later(stats[to_read]).sum())
    return FileKeys(keys, stats, len(to_read), gained)


def file_stats(paths: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """file_stat of many files: an (N, 5) array, zeros where a file cannot be examined (gone, a dangling link), and
    which could. The one cost per file of an unchanged rerun: when every file can be examined (the usual case) the
    stats are taken and unpacked in C-level maps, with no Python step per file."""
    n = len(paths)
    try:
        values = np.fromiter(chain.from_iterable(map(_STAT_FIELDS_OF, map(os.stat, paths))), dtype=np.int64,
                             count=5 * n)
        return values.reshape(n, 5), np.ones(n, dtype=bool)
    except (OSError, ValueError):
        pass  # some file cannot be examined: one at a time
    stats = np.zeros((n, 5), dtype=np.int64)
    readable = np.zeros(n, dtype=bool)
    for i, path in enumerate(paths):
        stat = file_stat(path)
        if stat is not None:
            stats[i], readable[i] = stat, True
    return stats, readable
