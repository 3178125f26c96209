"""Stores that grow without rewriting their rows: feature rows in immutable row files, mapped by virtual datasets.

Every change to a store writes a new store file and renames it into place (featx/writer.py), which keeps readers
and crashes safe; its metadata (keys, paths, labels: tens of bytes a row) is rewritten each time, but its feature
rows, the bulk of its bytes, need not be. Once the rows a seal keeps weigh `APPEND_FROM_BYTES` or more, the seal
writes only the new rows, into one new row file ``<store>.rows/<n>.h5`` (datasets ``features/<tap>``), and the new
store's ``/features/<tap>`` is an HDF5 virtual dataset mapping the store's row order onto the row files: h5py, and
any reader built on libhdf5 1.10 or later, reads it as one dataset. The first such seal turns the old,
self-contained store into the first row file with a hard link, without copying a byte. The store records where
each row lives: ``/rows/files`` (F,) utf-8 names relative to the store's folder, ``/rows/file`` (N,) int32 index
into them, ``/rows/row`` (N,) int64 row within that file.

Row files are never changed. Rows of deleted files stay in their row file, unmapped, until the dead rows are more
than `DEAD_SHARE` of all the row files hold, the row files more than `MAX_ROW_FILES` or the mapping's runs more than
`MAX_RUNS`: then the seal compacts, writing a self-contained store again. Smaller stores are always written whole
(one file, as before: rewriting them costs less than a second). Row files no store maps are removed after a seal,
unless a featx reader holds the row folder (a shared `flock` while a `Store` is open): then at a later seal.

HDF5's virtual datasets are used rather than appending in place to resizable datasets because a store's rows are in
its data's order (new files sort among the old ones), and because an HDF5 file changed in place is not readable
while it changes nor after a kill (see docs/INTERNALS.md for the numbers).
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import time
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

_APPEND_SETTING = os.environ.get("FEATX_APPEND_FROM_BYTES", "").strip()  # 0: always append (the tests' setting)
APPEND_FROM_BYTES = int(_APPEND_SETTING) if _APPEND_SETTING.isdigit() else 64 << 20
DEAD_SHARE = 0.25
MAX_ROW_FILES = 32
MAX_RUNS = 4096
UTF8 = h5py.string_dtype("utf-8")


def rows_folder(store: Path) -> Path:
    """`<store>.rows/`: the row files of a store that grew by appending."""
    store = Path(store)
    return store.with_name(store.name + ".rows")


@dataclass
class Layout:
    """Where each row of a store lives: `files` (names relative to the store's folder), and per row the index of
    its file and its row there."""

    files: list[str]
    file: np.ndarray
    row: np.ndarray

    def runs(self) -> int:
        """How many mappings a virtual dataset of this layout needs."""
        if not len(self.file):
            return 0
        breaks = (np.diff(self.file) != 0) | (np.diff(self.row) != 1)
        return int(breaks.sum()) + 1


def read_layout(store: Path, n_rows: int, taps: list[str]) -> Layout | None:
    """Where the rows of the store at `store` live: for a self-contained store, in itself (one file named ''); None
    when the store maps rows in a way this does not follow (another tool changed it): it is written whole again."""
    with h5py.File(store, "r", locking=False) as h5:
        virtual = [h5["features"][tap].is_virtual for tap in taps]
        if not any(virtual) and "rows" not in h5:
            return Layout([""], np.zeros(n_rows, np.int32), np.arange(n_rows, dtype=np.int64))
        if not all(virtual) or "rows" not in h5:
            return None
        rows = h5["rows"]
        files = [v.decode() if isinstance(v, bytes) else str(v) for v in rows["files"][...]]
        layout = Layout(files, rows["file"][...].astype(np.int32), rows["row"][...].astype(np.int64))
    if len(layout.file) != n_rows or len(layout.row) != n_rows or (n_rows and layout.file.max() >= len(files)):
        return None
    return layout


def row_file_lengths(store: Path, files: list[str], tap: str) -> list[int]:
    """Rows held by each row file (mapped or dead)."""
    lengths = []
    for name in files:
        with h5py.File(store.parent / name, "r", locking=False) as h5:
            lengths.append(h5["features"][tap].shape[0])
    return lengths


def new_row_file_name(store: Path) -> str:
    """A fresh row file name, relative to the store's folder."""
    return f"{rows_folder(store).name}/{time.time_ns():020d}-{os.getpid()}.h5"


def link_as_row_file(store: Path) -> str:
    """Make the self-contained store at `store` the first row file (a hard link: no byte copied); its name."""
    rows_folder(store).mkdir(exist_ok=True)
    name = new_row_file_name(store)
    os.link(store, store.parent / name)
    return name


def write_layout(h5: h5py.File, store: Path, layout: Layout, taps: list[str]) -> None:
    """/rows and a virtual /features/<tap> for every tap, in a store being written (whose final path is `store`)."""
    rows = h5.create_group("rows")
    rows.create_dataset("files", data=np.array(layout.files, dtype=object), dtype=UTF8)
    rows.create_dataset("file", data=layout.file.astype(np.int32))
    rows.create_dataset("row", data=layout.row.astype(np.int64))
    breaks = np.flatnonzero((np.diff(layout.file) != 0) | (np.diff(layout.row) != 1)) + 1
    starts = np.concatenate([[0], breaks]).astype(np.int64)
    ends = np.concatenate([breaks, [len(layout.file)]]).astype(np.int64)
    for tap in taps:
        sources = []
        for name in layout.files:
            with h5py.File(store.parent / name, "r", locking=False) as src:
                ds = src["features"][tap]
                sources.append(h5py.VirtualSource(name, f"features/{tap}", shape=ds.shape, dtype=ds.dtype))
        shape = (len(layout.file), *sources[0].shape[1:])
        virtual = h5py.VirtualLayout(shape=shape, dtype=sources[0].dtype)
        for start, end in zip(starts.tolist(), ends.tolist()):
            first = int(layout.row[start])
            virtual[start:end] = sources[int(layout.file[start])][first:first + end - start]
        h5.require_group("features").create_virtual_dataset(tap, virtual, fillvalue=np.nan)


def store_bytes(store: Path) -> int:
    """What a store weighs on disk: its file and the row files beside it; 0 when there is none."""
    store = Path(store)
    try:
        total = store.stat().st_size
    except OSError:
        return 0
    try:
        with os.scandir(rows_folder(store)) as children:
            for child in children:
                with contextlib.suppress(OSError):  # removed by a seal meanwhile
                    total += child.stat().st_size
    except OSError:
        pass  # no row folder
    return total


def missing_row_files(h5: h5py.File, store: Path) -> list[str]:
    """The row files the virtual datasets of an open store map that are not there."""
    names = set()
    for ds in h5["features"].values():
        if isinstance(ds, h5py.Dataset) and ds.is_virtual:
            names.update(source.file_name for source in ds.virtual_sources())
    return sorted(name for name in names if not (store.parent / name).is_file())


def hold_row_files(store: Path) -> int | None:
    """A shared lock on the store's row folder, held by a reader so that no seal removes a row file it may read;
    the descriptor to close, or None when the store has no row folder."""
    try:
        fd = os.open(rows_folder(store), os.O_RDONLY)
    except OSError:
        return None
    fcntl.flock(fd, fcntl.LOCK_SH)
    return fd


def remove_unmapped(store: Path, mapped: list[str]) -> None:
    """Remove the row files (and leftovers of killed seals) that the sealed store does not map, unless a reader
    holds the folder; the folder itself when nothing in it is mapped."""
    folder = rows_folder(store)
    try:
        fd = os.open(folder, os.O_RDONLY)
    except FileNotFoundError:
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return  # a reader may still map them: a later seal removes them
        keep = {Path(name).name for name in mapped}
        for child in folder.iterdir():
            if child.name not in keep:
                child.unlink(missing_ok=True)
        if not keep:
            folder.rmdir()
    finally:
        os.close(fd)
