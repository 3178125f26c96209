"""Rows for heads: features, labels and splits read from a featx store or from a foreign HDF5/NPZ file.

`open_rows` gives one `Rows` object for every kind of file. Features stay on disk until `read` (selected rows,
in memory) or `iter_chunks` (streamed, for data larger than memory) is called; both refuse NaN/inf rows.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import h5py
import numpy as np

from ..errors import FeatxError
from ..options import OptionError
from ..store import open_store, read_rows

X_NAMES = ("x", "features", "embeddings", "feats")
Y_NAMES = ("y", "labels", "label", "targets", "target")
SHOWN_BAD_ROWS = 5
CHUNK_BYTES = 64 << 20  # the most float32 row bytes iter_chunks reads at a time, whatever chunk_rows asks


@dataclass
class Rows:
    """A feature matrix on disk with its per-row metadata.

    classes is None for regression data (float targets). labels are class indices (-1 unlabelled), splits are
    'train' / 'val' / 'test' / '' and names identify rows in messages and outputs (image paths or row numbers).
    config is the featx store's config (None for foreign files).
    """

    path: Path
    tap: str
    n_rows: int
    n_features: int
    labels: np.ndarray
    classes: list[str] | None
    targets: np.ndarray | None
    splits: np.ndarray
    names: np.ndarray
    config: dict | None
    config_key: str | None
    _read_index: Callable[[np.ndarray], np.ndarray] = field(repr=False)
    _close: Callable[[], None] = field(repr=False)
    no_label_hint: str = ""  # an OptionError template's words (braces doubled but for the parameters)

    @property
    def task(self) -> str:
        """'classification', 'regression', or 'unlabelled' when no row has a label."""
        if self.targets is not None:
            return "regression"
        return "classification" if (self.labels >= 0).any() else "unlabelled"

    @property
    def labelled(self) -> np.ndarray:
        """Boolean mask of the rows that have a label or a finite target."""
        return np.isfinite(self.targets) if self.targets is not None else self.labels >= 0

    def describe(self) -> str:
        return f"{self.path} ({self.tap})"

    def read(self, rows: np.ndarray | None = None, chunk_rows: int = 65536) -> np.ndarray:
        """The selected rows (sorted index array, bool mask or None for all) as one float32 (n, D) array."""
        rows = self._index(rows)
        self.check_fits_in_memory(len(rows))
        try:
            out = np.empty((len(rows), self.n_features), dtype=np.float32)
            filled = 0
            for _, block in self.iter_chunks(rows, chunk_rows, check=False):
                out[filled : filled + len(block)] = block
                filled += len(block)
        except MemoryError:
            out = None  # free what was allocated before saying so
            raise self._memory_error(len(rows)) from None
        self.check_finite(out, rows)
        return out

    def check_fits_in_memory(self, n: int) -> None:
        """Raise the one-line 'does not fit' OptionError when n float32 rows need more than `available_memory()`:
        refused before allocating, since on Linux a large allocation succeeds and the kernel kills the process
        when the rows are written."""
        available = available_memory()
        if available is not None and n * self.n_features * np.dtype(np.float32).itemsize > available:
            raise self._memory_error(n, available)

    def _memory_error(self, n: int, available: int | None = None) -> OptionError:
        need = n * self.n_features * np.dtype(np.float32).itemsize
        free = f", {available / 1e9:.1f} GB available" if available is not None else ""
        return OptionError("{rows}: use {head=sgd}, which streams the store in chunks",
                           rows=f"{self.path}: tap {self.tap!r} does not fit in memory ({n} rows x {self.n_features} "
                                f"float32 features need {need:,} bytes, {need / 1e9:.1f} GB{free})")

    def iter_chunks(self, rows=None, chunk_rows: int = 65536, seed: int | None = None, check: bool = True):
        """Yield (row indices, float32 block) over the selected rows, at most `chunk_rows` rows and CHUNK_BYTES at a
        time.

        Rows are read in sorted runs. With a seed the order is shuffled: runs of about chunk_rows/64 rows are
        visited in a random order and mixed into each chunk, so that class-sorted stores still give mixed chunks.
        """
        rows = self._index(rows)
        chunk_rows = max(1, min(chunk_rows, CHUNK_BYTES // (4 * max(1, self.n_features))))
        if seed is None:
            spans = [rows[i : i + chunk_rows] for i in range(0, len(rows), chunk_rows)]
            groups = [[span] for span in spans]
        else:
            span = max(1, chunk_rows // 64)
            spans = [rows[i : i + span] for i in range(0, len(rows), span)]
            order = np.random.default_rng(seed).permutation(len(spans))
            per_chunk = max(1, chunk_rows // span)
            groups = [[spans[j] for j in order[i : i + per_chunk]] for i in range(0, len(order), per_chunk)]
        for group in groups:
            index = np.concatenate(group)
            parts = [self._read_rows(part) for part in group]
            block = parts[0] if len(parts) == 1 else np.concatenate(parts)
            del parts  # only the block stays while the caller holds it
            if check:
                self.check_finite(block, index)
            yield index, block

    def check_finite(self, block: np.ndarray, rows: np.ndarray) -> None:
        """Raise a FeatxError naming the rows of `block` (store rows `rows`) that hold NaN or inf."""
        bad = rows[~np.isfinite(block).all(axis=1)]
        if bad.size:
            raise nonfinite_error(self, bad)

    def close(self) -> None:
        self._close()

    def __enter__(self) -> "Rows":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _index(self, rows) -> np.ndarray:
        if rows is None:
            return np.arange(self.n_rows)
        rows = np.asarray(rows)
        return np.flatnonzero(rows) if rows.dtype == bool else rows.astype(np.int64)

    def _read_rows(self, rows: np.ndarray) -> np.ndarray:
        """Sorted rows as a float32 (n, D) block."""
        if rows.size == 0:
            return np.empty((0, self.n_features), dtype=np.float32)
        return np.asarray(self._read_index(rows), dtype=np.float32).reshape(len(rows), -1)


def available_memory() -> int | None:
    """Bytes this process can still allocate: the least of the system's MemAvailable, the room left under the
    process's address-space limit (RLIMIT_AS) and under its cgroup's memory.max; None where none is known."""
    import resource

    limits = []
    fields = _proc_fields("/proc/meminfo") | _proc_fields("/proc/self/status")
    if "MemAvailable" in fields:
        limits.append(fields["MemAvailable"])
    cap = resource.getrlimit(resource.RLIMIT_AS)[0]
    if cap != resource.RLIM_INFINITY and "VmSize" in fields:
        limits.append(cap - fields["VmSize"])
    try:
        cgroup = Path("/proc/self/cgroup").read_text().strip().rpartition(":")[2]
        folder = Path("/sys/fs/cgroup") / cgroup.lstrip("/")
        most = (folder / "memory.max").read_text().strip()
        if most != "max":
            limits.append(int(most) - int((folder / "memory.current").read_text()))
    except (OSError, ValueError):
        pass
    return max(0, min(limits)) if limits else None


def _proc_fields(path: str) -> dict[str, int]:
    """The 'Name: N kB' lines of a /proc file, in bytes; empty where the file does not exist."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError:
        return {}
    fields = {}
    for line in lines:
        name, _, value = line.partition(":")
        parts = value.split()
        if len(parts) == 2 and parts[1] == "kB" and parts[0].isdigit():
            fields[name] = int(parts[0]) * 1024
    return fields


def nonfinite_error(rows: Rows, bad: np.ndarray) -> FeatxError:
    shown = ", ".join(f"{i} ({rows.names[i]})" for i in bad[:SHOWN_BAD_ROWS])
    more = f" and {len(bad) - SHOWN_BAD_ROWS} more" if len(bad) > SHOWN_BAD_ROWS else ""
    return FeatxError(
        f"{rows.describe()}: {len(bad)} rows hold NaN or inf values (rows {shown}{more}): re-extract them or drop them"
    )


def no_labels_error(rows: Rows, needed_by: str) -> OptionError:
    hint = f" ({rows.no_label_hint})" if rows.no_label_hint else ""
    return OptionError("{path} has no labels" + hint + ": {needed_by} needs labelled rows (predict works on it)",
                       path=rows.path, needed_by=needed_by)


def open_rows(path, tap: str | None = None, x_key: str | None = None, y_key: str | None = None) -> Rows:
    """Open a featx store (tap = which features) or any HDF5/NPZ file with a 2-D feature array and a label vector.

    For foreign files `x_key`/`y_key` name the arrays; without them a single 2-D array (or one named x, features,
    embeddings) is taken, and a single 1-D vector of matching length (or one named y, labels, targets) as labels.
    Passing x_key/y_key reads a featx store as a plain HDF5 file.
    """
    path = Path(path)
    if not path.exists():
        raise FeatxError(f"{path}: no such file")
    if path.is_dir():
        raise FeatxError(f"{path}: is a folder, expected a featx store (.h5) or an HDF5/NPZ feature file")
    if path.suffix.lower() == ".npz":
        return _open_npz(path, x_key or tap, y_key)
    h5 = None
    try:
        h5 = h5py.File(path, "r", locking=False)
        is_store = x_key is None and y_key is None and "featx_schema" in h5.attrs
    except OSError as err:
        if h5 is not None:
            h5.close()
        raise FeatxError(f"{path}: neither an HDF5 nor an NPZ file ({str(err).splitlines()[0][:100]})") from err
    if is_store:
        h5.close()  # open_store opens (and checks) the store itself
        return _open_store(path, tap)
    return _open_hdf5(path, h5, x_key or tap, y_key)


def _open_store(path: Path, tap: str | None) -> Rows:
    store = open_store(path)
    try:
        tap = _choose_tap(store, tap)
        n_features = int(np.prod(store.feature_shape(tap)))
    except BaseException:
        store.close()
        raise
    classification = store.targets is None
    return Rows(
        path=path,
        tap=tap,
        n_rows=len(store),
        n_features=n_features,
        labels=store.labels if classification else np.full(len(store), -1, dtype=np.int64),
        classes=list(store.classes) if classification else None,
        targets=store.targets,
        splits=np.asarray(store.splits, dtype=str),
        names=np.asarray(store.paths, dtype=str),
        config=dict(store.config),
        config_key=store.config_key,
        _read_index=lambda rows: store.features(tap, rows),
        _close=store.close,
    )


def _choose_tap(store, tap: str | None) -> str:
    if not store.taps:
        raise FeatxError(f"{store.path}: holds no features")
    if tap is None:
        if len(store.taps) > 1:
            raise OptionError("{path} holds several taps ({taps}): choose one with {tap}", path=store.path,
                              taps=", ".join(store.taps))
        return store.taps[0]
    if tap not in store.taps:
        raise OptionError("{tap=}: no such tap in {path}; it holds: {taps}", tap=tap, path=store.path,
                          taps=", ".join(store.taps))
    return tap


def _open_npz(path: Path, x_key: str | None, y_key: str | None) -> Rows:
    try:
        npz = np.load(path, allow_pickle=False)
        shapes = {key: npz[key].shape for key in npz.files}
    except (OSError, ValueError) as err:
        raise FeatxError(f"{path}: not a readable NPZ file without pickles ({str(err).splitlines()[0][:100]})") from err
    x_key = _pick_x(path, shapes, x_key)
    x = npz[x_key]
    y_key, hint = _pick_y(path, shapes, y_key, x.shape[0])
    y = npz[y_key] if y_key else None
    return _foreign_rows(path, x_key, x.shape, lambda rows: x[rows], y, y_key, hint, close=npz.close)


def _open_hdf5(path: Path, h5: h5py.File, x_key: str | None, y_key: str | None) -> Rows:
    """Rows of a foreign HDF5 file, already open as `h5` (closed here on error, else by Rows.close)."""
    try:
        datasets: dict[str, h5py.Dataset] = {}

        def collect(name, obj):  # returns None: a value would stop the visit
            if isinstance(obj, h5py.Dataset):
                datasets[name] = obj

        h5.visititems(collect)
        shapes = {name: ds.shape for name, ds in datasets.items()}
        x_key = _pick_x(path, shapes, x_key.strip("/") if x_key else None)
        x = datasets[x_key]
        y_key, hint = _pick_y(path, shapes, y_key.strip("/") if y_key else None, x.shape[0])
        y = datasets[y_key][...] if y_key else None
    except BaseException:
        h5.close()
        raise
    return _foreign_rows(path, x_key, x.shape, lambda rows: read_rows(x, rows), y, y_key, hint, close=h5.close)


def _listing(shapes: dict) -> str:
    return ", ".join(f"{key} {tuple(shape)}" for key, shape in shapes.items()) or "no arrays"


def _pick_x(path: Path, shapes: dict, x_key: str | None) -> str:
    if x_key is not None:
        if x_key not in shapes:
            raise OptionError("{x=}: no such array in {path}; it holds: {listing}", x=x_key, path=path,
                              listing=_listing(shapes))
        if len(shapes[x_key]) < 2:
            raise OptionError("{x=}: expected a 2-D feature array (rows x features), got shape {shape}", x=x_key,
                              shape=shapes[x_key])
        return x_key
    matrices = [key for key, shape in shapes.items() if len(shape) == 2]
    named = [key for key in matrices if key.rsplit("/", 1)[-1].lower() in X_NAMES]
    if len(matrices) == 1 or len(named) == 1:
        return (named or matrices)[0]
    raise OptionError("{path}: which array holds the features? pass {x=KEY} (it holds: {listing})", path=path,
                      listing=_listing(shapes))


def _pick_y(path: Path, shapes: dict, y_key: str | None, n: int) -> tuple[str | None, str]:
    """The label vector's key, or (None, a hint for the 'no labels' error)."""
    if y_key is not None:
        if y_key not in shapes:
            raise OptionError("{y=}: no such array in {path}; it holds: {listing}", y=y_key, path=path,
                              listing=_listing(shapes))
        if tuple(shapes[y_key]) != (n,):
            raise OptionError("{y=}: expected a vector of {n} labels, got shape {shape}", y=y_key, n=n,
                              shape=tuple(shapes[y_key]))
        return y_key, ""
    vectors = [key for key, shape in shapes.items() if tuple(shape) == (n,)]
    named = [key for key in vectors if key.rsplit("/", 1)[-1].lower() in Y_NAMES]
    if len(vectors) == 1 or len(named) == 1:
        return (named or vectors)[0], ""
    listed = ", ".join(vectors).replace("{", "{{").replace("}", "}}")
    return None, f"pass {{y=KEY}} (vectors of {n} values: {listed})" if vectors else "it has no label vector"


def _foreign_rows(path, x_key, shape, read_index, y, y_key, hint, close) -> Rows:
    n = int(shape[0])
    labels, classes, targets = _labels(path, y_key, y, n)
    return Rows(
        path=path,
        tap=x_key,
        n_rows=n,
        n_features=int(np.prod(shape[1:])),
        labels=labels,
        classes=classes,
        targets=targets,
        splits=np.full(n, "", dtype=str),
        names=np.arange(n).astype(str),
        config=None,
        config_key=None,
        _read_index=read_index,
        _close=close,
        no_label_hint=hint,
    )


def _labels(path: Path, y_key: str | None, y, n: int):
    """(labels, classes, targets) from a foreign label vector, typed the way scikit-learn's type_of_target does."""
    from sklearn.utils.multiclass import type_of_target

    if y is None:
        return np.full(n, -1, dtype=np.int64), [], None
    y = np.asarray(y)
    if y.dtype.kind == "S":
        y = y.astype(str)
    kind = type_of_target(y)
    if kind == "continuous":
        return np.full(n, -1, dtype=np.int64), None, y.astype(np.float64)
    if kind not in ("binary", "multiclass"):
        raise OptionError("{y=} in {path}: expected class labels or float targets, got {kind} values", y=y_key,
                          path=path, kind=kind)
    values, labels = np.unique(y, return_inverse=True)
    return labels.astype(np.int64), [str(v) for v in values], None


DEFAULT_EVAL_SPLITS = ("val", "test")  # what `evaluate` scores without --split, the first one present
ALL_ROWS = "all"


def evaluation_rows(labelled: np.ndarray, splits, split: str | None, where) -> tuple[np.ndarray, str, str]:
    """(indices of the rows to score, the split scored, which rows in words) among the `labelled` rows (a boolean
    mask) of `where` (the data, for messages). `split`: that split's rows; 'all': every labelled row; None: the
    'val' rows when there are any, else the 'test' rows, else every labelled row."""
    splits = np.asarray(splits, dtype=str)
    present = sorted(set(splits[labelled]) - {""})
    chosen = split or next((name for name in DEFAULT_EVAL_SPLITS if name in present), ALL_ROWS)
    selected = labelled if chosen == ALL_ROWS else labelled & (splits == chosen)
    if not selected.any():
        raise OptionError("{split=}: no labelled rows in {where} (its splits: {present}; {split=%s} scores every "
                          "labelled row)" % ALL_ROWS, split=chosen, where=where, present=", ".join(present) or "none")
    how = "all labelled rows" if chosen == ALL_ROWS else f"split {chosen!r}"
    if split is None:
        how += f" (no {' or '.join(DEFAULT_EVAL_SPLITS)} split)" if chosen == ALL_ROWS else \
            f" (by default; split {ALL_ROWS!r} scores every labelled row)"
    return np.flatnonzero(selected), chosen, how


def train_eval_rows(rows: Rows, val_split: float = 0.2, seed: int = 0) -> tuple[np.ndarray, np.ndarray, str]:
    """(training rows, evaluation rows, how they were chosen) among the labelled rows.

    A file with splits trains on 'train' and evaluates on 'val' ('test' is left for `evaluate`). Without a 'val'
    split a stratified, seeded `val_split` fraction of the training rows is held out; 0 holds out nothing.
    """
    if not 0 <= val_split < 1:
        raise OptionError("{val_split=}: expected a fraction in [0, 1)", val_split=val_split)
    labelled = rows.labelled
    if not labelled.any():
        raise no_labels_error(rows, "fitting a head")
    has_splits = bool((rows.splits != "").any())
    train = labelled & (rows.splits == "train") if has_splits else labelled
    if not train.any():
        present = ", ".join(sorted(set(rows.splits[labelled]) - {""}))
        raise FeatxError(f"{rows.path} has no labelled rows in split 'train' (its splits: {present})")
    evaluate = labelled & (rows.splits == "val")
    if evaluate.any():
        return np.flatnonzero(train), np.flatnonzero(evaluate), "split 'val'"
    if val_split == 0:
        return np.flatnonzero(train), np.empty(0, dtype=np.int64), "none (0% held out)"
    from ..sources import stratified_holdout

    candidates = np.flatnonzero(train)
    strata = rows.labels[candidates] if rows.classes is not None else np.zeros(len(candidates), dtype=np.int64)
    held = np.asarray(stratified_holdout(strata, val_split, seed), dtype=bool)
    return candidates[~held], candidates[held], f"stratified {val_split:g} hold-out (seed {seed})"
