"""Crash-safe, incremental writing of one store.

HDF5 files are not crash-safe while open for writing, so the final store is never open for writing during a run:

* ``<store>.parts/`` holds this run's work. The folder is also the lock: one writer at a time (``flock``, which
  the kernel drops when a process dies, even under ``kill -9``).
* Each computed batch becomes a small segment file written as ``*.tmp`` and renamed into place when complete, so a
  kill loses at most the batch in flight, and the next run finds every committed segment.
* Sealing writes the new store inside the parts folder and renames it over the final path (atomic), then removes
  the parts folder. A kill at any instant leaves either the old store or the new one, both complete.
* The shards of a split job (torchrun ranks, --num-shards) write at the same time: each holds a shared lock and
  commits into its own subfolder ``<store>.parts/shard-I-of-K/``; the one that seals takes the lock exclusively.
* A run that ends without anything committed (an error before the first batch, Ctrl-C) removes the parts folder.
* A store whose rows weigh more than a few tens of MB is not copied at each seal: the new rows go to a row file of
  their own and the sealed store maps them (featx/rowfiles.py), so adding k rows costs O(k) bytes written.
* Which old rows the sealed store keeps is decided by `plan` (featx.retention.merge), and `seal` writes only the
  plans that `plan` made.
"""
from __future__ import annotations

import fcntl
import os
import shutil
import time
from itertools import repeat
from pathlib import Path
from typing import NamedTuple

import h5py
import numpy as np

from .choices import recorded_decode
from .errors import FeatxError
from .options import OptionError
from .gcpause import without_gc
from .keys import STAT_FIELDS, host_id, trusted_later
from .retention import DataRows, SealPlan, holds, merge, row_bound
from .rowfiles import (
    APPEND_FROM_BYTES, DEAD_SHARE, MAX_ROW_FILES, MAX_RUNS, Layout, link_as_row_file, new_row_file_name,
    read_layout, remove_unmapped, row_file_lengths, write_layout,
)
from .store import (
    KEY_DTYPE, Store, create_features, create_h5, create_items, create_store, open_store, parts_folder, read_rows,
    segment_files, write_file_stats,
)

LOCK_RETRIES = 20


class RowSource(NamedTuple):
    """Where the features of one content key already are: a file (the old store or a segment) and a row."""

    file: Path
    row: int


def describe_config(config: dict) -> str:
    """A short one-line identity of a config for error messages."""
    fields = ("backbone", "weights", "taps", "pooling", "token_pool", "transform", "precision", "dtype", "decode")
    parts = []
    for name in fields:
        value = recorded_decode(config) if name == "decode" else config.get(name)
        if isinstance(value, dict):
            value = "{}x{}".format(value.get("resize"), value.get("crop"))
        elif isinstance(value, list):
            value = ",".join(map(str, value))
        parts.append(f"{name}={value}")
    return " ".join(parts)


class StoreWriter:
    """Lock a store path, collect committed segments, and seal them with the old store into a new one.

    `subfolder` (a shard of a split job): hold the lock shared with the other shards and commit into
    ``parts/subfolder``; `exclusive()` takes the lock for sealing."""

    def __init__(self, output: Path, config: dict, config_key: str, overwrite: bool = False, subfolder: str | None = None):
        self.output = Path(output)
        self.parts = parts_folder(self.output)
        self.config = config
        self.config_key = config_key
        self.overwrite = overwrite
        self.segments = self.parts / subfolder if subfolder else self.parts  # where this process commits
        self._shared = subfolder is not None
        self._lock_fd: int | None = None
        self._counter = 0
        self._indexed: set[Path] = set()
        self.available: dict[str, RowSource] = {}
        self.failures: dict[str, str] = {}  # content key -> why the old store's file of it could not be decoded
        self._old: Store | None = None  # the old store's metadata (closed) when its config matches this run's
        self._old_index: dict[str, int] = {}  # content key -> its first row in the old store
        self._replaced: Store | None = None  # with overwrite: the old store's metadata, to count what goes
        self._row_bytes = 0  # bytes of one row over every tap, once a store or segment has shown it
        self._plans: list[SealPlan] = []  # the plans `plan` made: the only ones `seal` writes

    # -- lock ----------------------------------------------------------------------------------------------------
    def __enter__(self) -> "StoreWriter":
        self._acquire_lock()
        try:
            self._load_existing()
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        try:
            self._remove_if_empty()
        finally:
            self._release_lock()

    def _remove_if_empty(self) -> None:
        """Leave no parts folder that holds no file (a run that failed or stopped before its first commit). Only
        under the exclusive lock: the shards of a split job share the folder while they run."""
        if self._lock_fd is None or self._shared:
            return
        try:
            if all(not files for _, _, files in os.walk(self.parts)):
                shutil.rmtree(self.parts)
        except OSError:
            pass  # removed meanwhile (sealed): nothing is lost either way

    def _acquire_lock(self) -> None:
        mode = fcntl.LOCK_SH if self._shared else fcntl.LOCK_EX
        for _ in range(LOCK_RETRIES):
            try:
                self.parts.mkdir(exist_ok=True)
                fd = os.open(self.parts, os.O_RDONLY)
            except FileNotFoundError:
                continue  # removed by a run that sealed just now: make it again
            except OSError as err:
                raise FeatxError(f"cannot create the lock folder {self.parts} ({err.strerror})") from err
            try:
                fcntl.flock(fd, mode | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise FeatxError(
                    f"{self.output} is being written by another featx process (lock {self.parts}): wait for it to finish"
                ) from None
            if self._is_locked_folder(fd):
                self._lock_fd = fd
                return
            os.close(fd)  # another run sealed and removed the folder between mkdir and flock: take the new one
        raise FeatxError(f"could not lock {self.parts}: it keeps being removed by another process")

    def _is_locked_folder(self, fd: int) -> bool:
        try:
            return os.stat(self.parts).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            return False

    def exclusive(self) -> bool:
        """Turn the shared lock of a shard into the exclusive one needed to seal, waiting for the other shards to
        let go of theirs. False when another shard sealed meanwhile (the parts folder is gone)."""
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
        self._shared = False
        return self._is_locked_folder(self._lock_fd)

    def _release_lock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    # -- what is already computed ---------------------------------------------------------------------------------
    def _load_existing(self) -> None:
        self.segments.mkdir(exist_ok=True)
        for stale in (self.segments if self._shared else self.parts).glob("**/*.tmp"):  # only this process writes there
            stale.unlink()
        if self.overwrite:
            for seg in self._segment_files():
                seg.unlink()
            if self.output.exists():
                try:
                    with open_store(self.output) as old:
                        self._replaced = old
                except FeatxError:
                    pass  # a damaged store has no rows to count
            return
        if self.output.exists():
            self._index_old_store()
        self.refresh()

    def _segment_files(self) -> list[Path]:
        """Committed segments: this run's, and those of every shard of a split job."""
        return segment_files(self.parts)

    def refresh(self) -> None:
        """Index the segments committed since the last look (by this process or by the other shards)."""
        for seg in self._segment_files():
            if seg not in self._indexed:
                self._index_segment(seg)

    @without_gc
    def _index_old_store(self) -> None:
        try:
            old = open_store(self.output)
        except FeatxError as err:
            raise OptionError("{problem}: {overwrite=True} replaces it, or choose another store",
                              problem=str(err)) from err
        with old:
            if old.config_key != self.config_key:
                raise OptionError("{path} was made with another config ({old}); this run asks for ({new}): choose "
                                  "another {output}, or pass {overwrite=True} to replace it", path=self.output,
                                  old=describe_config(old.config), new=describe_config(self.config))
            keys = old.keys.tolist()
            rows = range(len(keys) - 1, -1, -1)
            self._old_index = dict(zip(reversed(keys), rows))  # the first row of each key
            # RowSource's own constructor, without its Python-level __new__ (a million rows in a blink)
            sources = map(tuple.__new__, repeat(RowSource), zip(repeat(self.output), rows))
            self.available = {**dict(zip(reversed(keys), sources)), **self.available}
            self.failures = {str(key): reason for key, (_, reason) in zip(old.failed_keys, old.failed) if key}
        self._old = old
        self._row_bytes = old.row_bytes

    def _index_segment(self, seg: Path) -> None:
        try:
            with h5py.File(seg, "r", locking=False) as h5:
                seg_key = str(h5.attrs.get("config_key", ""))
                keys = [k.decode("ascii") for k in h5["key"][...]]
                row_bytes = sum(int(np.prod(ds.shape[1:], dtype=np.int64)) * ds.dtype.itemsize
                                for name, ds in h5.items() if name != "key")
        except (OSError, KeyError) as err:  # renamed into place only when complete, so this is outside damage
            raise FeatxError(f"{seg}: unreadable segment of an unfinished run ({err}); delete it to recompute its rows") from err
        if seg_key != self.config_key:
            raise OptionError("{parts} holds an unfinished run with another config; rerun it with the same options to "
                              "finish it, or pass {overwrite=True} to discard it", parts=self.parts)
        for row, key in enumerate(keys):
            self.available.setdefault(key, RowSource(seg, row))
        self._indexed.add(seg)
        self._row_bytes = self._row_bytes or row_bytes

    # -- committing ----------------------------------------------------------------------------------------------
    def commit(self, keys: list[str], features: dict[str, np.ndarray]) -> None:
        """Write one batch of computed rows as a segment, atomically; after this returns a kill loses nothing of it."""
        if not keys:
            return
        self._counter += 1
        name = f"seg-{time.time_ns():020d}-{os.getpid()}-{self._counter:06d}"
        tmp = self.segments / f"{name}.tmp"
        final = self.segments / f"{name}.h5"
        with create_h5(tmp, final) as h5:
            h5.attrs["config_key"] = self.config_key
            h5.create_dataset("key", data=np.asarray(keys, dtype=KEY_DTYPE))
            for tap, arr in features.items():
                h5.create_dataset(tap, data=arr)
        for row, key in enumerate(keys):
            self.available.setdefault(key, RowSource(final, row))
        self._indexed.add(final)
        self._row_bytes = self._row_bytes or sum(arr[0].nbytes for arr in features.values())

    # -- sealing -------------------------------------------------------------------------------------------------
    def plan(self, fresh: DataRows, retention: str = "mirror", size_limit: int | None = None) -> SealPlan:
        """The store that sealing would write: the old store merged with this call's rows (featx.retention.merge,
        which decides which old rows stay). `size_limit` (bytes of feature rows) bounds a private cache."""
        plan = merge(self._old, fresh, retention, row_bound(size_limit, self._row_bytes, len(fresh.keys)))
        if self._replaced is not None:  # --overwrite: every old row whose content the new store lacks goes
            plan.dropped = len(set(self._replaced.keys) - set(plan.keys))
        self._plans.append(plan)
        return plan

    def is_unchanged(self, plan: SealPlan) -> bool:
        """True when the old store already holds exactly this plan and nothing new was committed."""
        old = self._old  # read by _index_old_store under this run's lock, so still what is on disk
        return old is not None and not self._segment_files() and holds(old, plan)

    @without_gc
    def seal(self, plan: SealPlan, taps: list[str]) -> None:
        """Write the final store from the old store and the segments, rename it into place, drop the parts. The
        stat index records the plan's entries for the call's rows (`SealPlan.data_stats`); rows carried over keep
        theirs."""
        if not any(plan is made for made in self._plans):
            raise ValueError("StoreWriter.seal writes only a plan made by StoreWriter.plan")
        layout = self._appended(plan, taps)
        tmp = self.parts / "sealing.tmp"
        with create_store(tmp, self.output, self.config, self.config_key) as h5:  # on failure old store, segments stay
            create_items(
                h5, keys=plan.keys, paths=plan.paths, splits=plan.splits, labels=plan.labels,
                targets=plan.targets, classes=plan.classes, failed=plan.failed, roots=plan.roots,
                row_roots=plan.row_roots, failed_roots=plan.failed_roots, failed_keys=plan.failed_keys,
            )
            write_file_stats(h5, *self._row_stats(plan), host_id())
            if layout is None:
                sources: dict[Path, list[tuple[int, int]]] = {}
                for dest, key in enumerate(plan.keys):
                    loc = self.available[key]
                    sources.setdefault(loc.file, []).append((loc.row, dest))
                self._copy_features(h5, sources, taps, len(plan.keys))
            else:
                write_layout(h5, self.output, layout, taps)
        remove_unmapped(self.output, layout.files if layout else [])  # under the lock: the next writer's are safe
        self.remove_parts()

    def _appended(self, plan: SealPlan, taps: list[str]) -> Layout | None:
        """The layout of the sealed store when its new rows go to a row file of their own and the rows it keeps stay
        where they are (featx/rowfiles.py); None when the store is to be written whole (small, or worth compacting).
        Writes that row file (and links a self-contained old store as the first one)."""
        if self._old is None or not len(self._old) or not taps:
            return None
        index = self._old_index
        old_rows = np.fromiter((index.get(key, -1) for key in plan.keys), dtype=np.int64, count=len(plan.keys))
        kept = old_rows >= 0  # rows whose features the old store holds
        if int(kept.sum()) * self._row_bytes < APPEND_FROM_BYTES:
            return None
        n_old = len(self._old)
        old = read_layout(self.output, n_old, taps)
        if old is None:
            return None
        lengths = row_file_lengths(self.output, old.files, taps[0]) if old.files[0] else [n_old]
        new = np.flatnonzero(~kept)
        total = sum(lengths) + len(new)
        if total - len(plan.keys) > DEAD_SHARE * total or len(old.files) + bool(len(new)) > MAX_ROW_FILES:
            return None
        file = np.full(len(plan.keys), len(old.files), dtype=np.int32)
        row = np.zeros(len(plan.keys), dtype=np.int64)
        file[kept], row[kept] = old.file[old_rows[kept]], old.row[old_rows[kept]]
        row[new] = np.arange(len(new))
        layout = Layout(list(old.files), file, row)
        if layout.runs() > MAX_RUNS:
            return None
        if not old.files[0]:  # a self-contained store becomes the first row file
            try:
                layout.files[0] = link_as_row_file(self.output)
            except OSError:
                return None  # a file system without hard links: written whole
        if len(new):
            layout.files.append(self._write_row_file(plan, new, taps))
        return layout

    def _write_row_file(self, plan: SealPlan, new: np.ndarray, taps: list[str]) -> str:
        """The rows `new` of `plan` (computed in segments) as a new row file, written atomically; its name."""
        name = new_row_file_name(self.output)
        final = self.output.parent / name
        by_file: dict[Path, list[tuple[int, int]]] = {}
        for dest, i in enumerate(new.tolist()):
            loc = self.available[plan.keys[i]]
            by_file.setdefault(loc.file, []).append((loc.row, dest))
        with create_h5(final.with_name(final.name + ".tmp"), final) as h5:
            h5.create_dataset("key", data=np.asarray([plan.keys[i] for i in new], dtype=KEY_DTYPE))
            self._copy_features(h5, by_file, taps, len(new))
        return name

    def _row_stats(self, plan: SealPlan) -> tuple[np.ndarray, np.ndarray]:
        """The stat index of the sealed store, for its rows and for its failures: the call's entries for its own,
        and for those carried over from the old store the entries of its index that a later run would trust
        (featx.keys.StatIndex)."""
        rows = np.zeros((len(plan.keys), len(STAT_FIELDS)), dtype=np.int64)
        failed = np.zeros((len(plan.failed), len(STAT_FIELDS)), dtype=np.int64)
        if plan.data_stats is not None and len(plan.data_rows):
            rows[plan.data_rows] = plan.data_stats
        if plan.data_failed_stats is not None:
            failed[plan.old_failed < 0] = plan.data_failed_stats
        old = self._old
        stats = None if old is None else old.file_stats
        if stats is None or old.file_stats_host != host_id() or stats.shape != (len(old), len(STAT_FIELDS)):
            return rows, failed
        same_root = np.array([root in plan.roots for root in old.roots], dtype=bool)  # not adopted by another data
        root_here = np.array([plan.roots.index(root) if ok else -1 for root, ok in zip(old.roots, same_root)])
        for out, old_index, old_stats, old_roots, new_roots in (
                (rows, plan.old_rows, stats, old.row_roots, plan.row_roots),
                (failed, plan.old_failed, old.failed_stats, old.failed_roots, plan.failed_roots)):
            carried = np.flatnonzero(old_index >= 0)
            source = old_index[carried]
            trusted = trusted_later(old_stats[source]) & (root_here[old_roots[source]] == new_roots[carried])
            out[carried[trusted]] = old_stats[source[trusted]]
        return rows, failed

    def _copy_features(self, h5: h5py.File, sources, taps: list[str], n_rows: int) -> None:
        for tap in taps:
            out = None
            for file, pairs in sources.items():
                with h5py.File(file, "r", locking=False) as src_h5:
                    src = src_h5["features"][tap] if file == self.output else src_h5[tap]
                    if out is None:
                        out = create_features(h5, tap, (n_rows, *src.shape[1:]), src.dtype)
                    copy_rows(src, out, np.asarray(pairs, dtype=np.int64))
            if out is None:
                create_features(h5, tap, (0, 0), np.float32)

    def remove_parts(self) -> None:
        """Remove the parts folder and everything in it (under the exclusive lock, once nothing there is needed)."""
        for child in self.parts.iterdir():
            if child.is_dir():
                shutil.rmtree(child)
            else:
                child.unlink()
        self.parts.rmdir()


def record_file_stats(output: Path, config: dict, config_key: str, fresh: DataRows, retention: str,
                      size_limit: int | None) -> bool:
    """Seal the store at `output` again with the stat index entries of `fresh` (DataRows.stats) when it still holds
    exactly the rows `fresh` asks for: no row changes, later runs trust those files' keys without reading them. Best
    effort: False when the store is busy, read-only, on a full disk or changed meanwhile (the next run reads those
    files again, nothing is lost)."""
    try:
        with StoreWriter(output, config, config_key) as writer:
            plan = writer.plan(fresh, retention, size_limit)
            if not writer.is_unchanged(plan):
                writer.remove_parts()
                return False
            with open_store(output) as store:
                taps = list(store.taps)
            writer.seal(plan, taps)
            return True
    except (FeatxError, OSError):
        return False


def copy_rows(src: h5py.Dataset, out: h5py.Dataset, pairs: np.ndarray, chunk_bytes: int = 16 << 20) -> None:
    """Copy src rows to out rows given (src_row, dest_row) pairs, in bounded-memory chunks of contiguous writes:
    at most 4096 rows and about `chunk_bytes` of them at a time (rows of unpooled maps can be megabytes each)."""
    row_bytes = max(1, int(np.prod(src.shape[1:], dtype=np.int64)) * src.dtype.itemsize)
    chunk = int(min(4096, max(1, chunk_bytes // row_bytes)))
    pairs = pairs[np.argsort(pairs[:, 1], kind="stable")]
    for start in range(0, len(pairs), chunk):
        part = pairs[start : start + chunk]
        values = read_rows(src, part[:, 0])
        dest = part[:, 1]
        breaks = np.flatnonzero(np.diff(dest) != 1) + 1
        for run in np.split(np.arange(len(dest)), breaks):
            out[dest[run[0]] : dest[run[-1]] + 1] = values[run]
