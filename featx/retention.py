"""Which rows a sealed store keeps: the one function that decides it, `merge`.

A store holds rows of one or several data (a folder, a CSV or list file, 'digits', a service's uploads), each row
under its data's root. A call that writes a store brings the rows of its own data as they are now (`DataRows`);
`merge` takes them and the old store and returns the `SealPlan`: every row of the sealed store, in order, and what
changed. `StoreWriter.seal` writes only plans that `StoreWriter.plan` made with `merge`, so no caller can drop a
row by building its own plan.

The rule. An old row stays unless one of these holds:

* the file at its path now has other content, or its content is in this data under another path (renamed, moved
  to another class): the current row replaces it, and nothing computed is lost;
* its file is gone from the data being written and the call mirrors that data (`retention="mirror"`, extract's
  default), as long as that drops at most `drop_limit(rows of the store)`; more than that is refused in one line
  before anything is computed, because it looks like the wrong folder, not like deleted files;
* the user asked for it: `retention="prune"` (`featx extract --prune`: the store mirrors this data alone, other
  data's rows go too), or a private cache's size limit (`max_rows`: the head's cache under `featx predict`, which
  drops the oldest other data first and never this call's rows).

Rows of other data are always kept otherwise: a store extracted from a second folder holds both, and
`retention="add"` (predict's `--store`, the service's cache) keeps even the rows of files gone from its own data.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from .choices import RETENTIONS
from .errors import FeatxError
from .options import OptionError
from .gcpause import without_gc
from .sources import DIGITS_SPEC, unreadable_reason

UNRECORDED = ""  # the root of rows of a store written before stores recorded their data (store.UNRECORDED_ROOT)
DROP_LIMIT_ROWS = 5  # a mirroring call may drop this many rows of gone files ...
DROP_LIMIT_SHARE = 0.1  # ... or this share of the store's rows, whichever is more; beyond that it needs --prune


def data_root(data) -> str:
    """The root under which a store records the rows of `data`: the absolute, resolved path of the folder, CSV,
    list or image file, or 'digits'; for several data (featx.sources.merge_sources) the working folder, which
    their paths are relative to."""
    if isinstance(data, (list, tuple)):
        return data_root(data[0]) if len(data) == 1 else os.path.realpath(os.getcwd())
    if data == DIGITS_SPEC:
        return DIGITS_SPEC
    return os.path.realpath(os.fspath(data))


def row_bound(size_limit: int | None, row_bytes: int, fresh_rows: int) -> int | None:
    """The most rows a private cache of `size_limit` bytes of feature rows keeps (never fewer than this call's)."""
    if size_limit is None or not row_bytes:
        return None
    return max(fresh_rows, size_limit // row_bytes)


def drop_limit(n_rows: int) -> int:
    """How many rows of files gone from its data a mirroring call may drop from a store of `n_rows` rows."""
    return max(DROP_LIMIT_ROWS, int(n_rows * DROP_LIMIT_SHARE))


@dataclass
class DataRows:
    """The rows one call brings for its data, in its order: labels index `classes` (-1 unlabelled), or `targets`
    (regression); `failed` are (path, reason) of its files that gave no row, `failed_keys` the content key of each
    that could be read but not decoded ('' for the others); `stats`, when known, the stat index entry of each row's
    file (featx.keys.STAT_FIELDS), which the sealed store records, and `failed_stats` those of the failures."""

    root: str
    keys: list[str]
    paths: list[str]
    splits: list[str]
    classes: list[str]
    labels: list[int] | None
    targets: list[float] | None
    failed: list[tuple[str, str]]
    unread: list[str] = field(default_factory=list)  # folders of the data that could not be listed
    stats: np.ndarray | None = field(default=None, repr=False)
    failed_keys: list[str] = field(default_factory=list)
    failed_stats: np.ndarray | None = field(default=None, repr=False)


@without_gc
def data_rows(root: str, source, keys, available, failures: dict[str, str], stats: np.ndarray | None = None) -> DataRows:
    """The rows of `source` (a featx.sources.Source) whose content key is in `available`, in source order; the
    other items are failures (unreadable, a decode failure of `failures`: content key -> reason, or not computed),
    after the folders the source could not read. `stats`: the stat row of each item (featx.keys.FileKeys.stats)."""
    items = source.items
    failed = list(source.failed)
    failed_keys = [""] * len(failed)
    failing: list[int] = []  # items that failed to decode
    if all(map(available.__contains__, keys)):  # the usual case: every item gives a row
        taken, rows = slice(None), items
    else:
        taken = []
        for i, key in enumerate(keys):
            if key is not None and key in available:
                taken.append(i)
                continue
            item = items[i]
            if key is None:
                reason = unreadable_reason(item.path)
            elif key in failures:
                reason = failures[key]
                failing.append(i)
            else:
                reason = "not computed"
            failed.append((item.relpath, reason))
            failed_keys.append(key if key in failures else "")
        rows = [items[i] for i in taken]
    paths, splits = [item.relpath for item in rows], [item.split for item in rows]
    labels, targets = [item.label for item in rows], [item.target for item in rows]
    regression = source.task == "regression"
    failed_stats = None
    if stats is not None:
        stats = np.asarray(stats, dtype=np.int64)
        failed_stats = np.zeros((len(failed), stats.shape[1]), dtype=np.int64)
        failed_stats[np.flatnonzero([bool(key) for key in failed_keys])] = stats[failing]
    return DataRows(
        root=root,
        keys=list(keys) if isinstance(taken, slice) else [keys[i] for i in taken],
        paths=paths,
        splits=splits,
        classes=list(source.classes),
        labels=None if regression else labels,
        targets=targets if regression else None,
        failed=failed,
        unread=[folder for folder, _ in source.failed],
        stats=None if stats is None else stats[taken],
        failed_keys=failed_keys,
        failed_stats=failed_stats,
    )


@dataclass
class SealPlan:
    """Everything the sealed store holds besides features, in row order, and what changed.

    `data_rows` are the plan's rows of the call's data (in its order); `old_rows` the row of the old store each row
    is carried over from (-1 for the call's rows); `data_stats` the stat index entries of the call's rows, when the
    call knew them; `failed_keys` the content key of each failure ('' when none); `old_failed` the old store's
    failure each failure is carried over from (-1 for the call's, whose stat index entries are `data_failed_stats`);
    `dropped` counts old rows whose content the sealed store no longer holds; `other` maps each
    other data whose rows are kept to their count."""

    roots: list[str]
    row_roots: np.ndarray
    keys: list[str]
    paths: list[str]
    splits: list[str]
    classes: list[str]
    labels: np.ndarray | None
    targets: np.ndarray | None
    failed: list[tuple[str, str]]
    failed_roots: np.ndarray
    data_rows: np.ndarray = field(repr=False)
    old_rows: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64), repr=False)
    data_stats: np.ndarray | None = field(default=None, repr=False)
    failed_keys: list[str] = field(default_factory=list)
    old_failed: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64), repr=False)
    data_failed_stats: np.ndarray | None = field(default=None, repr=False)
    dropped: int = 0
    other: dict[str, int] = field(default_factory=dict)


def _objects(values) -> np.ndarray:
    """A column of strings (a list or an array) as a 1-D object array."""
    if isinstance(values, np.ndarray) and values.dtype == object:
        return values
    out = np.empty(len(values), dtype=object)
    out[:] = values.tolist() if isinstance(values, np.ndarray) else values
    return out


def _old_roots(old, fresh: DataRows) -> list[str]:
    """The old store's roots, where rows whose root was not recorded (a store written before roots were) count as
    this data's when some of them has the path and content of one of its rows."""
    roots = list(old.roots)
    if UNRECORDED in roots:
        unrecorded = roots.index(UNRECORDED)
        ours = set(zip(fresh.paths, fresh.keys))
        if any(r == unrecorded and (str(path), str(key)) in ours
               for r, path, key in zip(old.row_roots, old.paths, old.keys)):
            roots[unrecorded] = fresh.root
    return roots


@without_gc
def merge(old, fresh: DataRows, retention: str = "mirror", max_rows: int | None = None) -> SealPlan:
    """The plan of the store sealed from `old` (a featx.store.Store's metadata, or None) and this call's `fresh`
    rows under `retention` (see the module docstring); `max_rows` bounds a private cache. FeatxError when
    mirroring would drop more than `drop_limit` rows, or when the data's labels cannot share one store.

    Rows are handled as index arrays into the old store's columns, so that a plan costs array operations and a few
    set look-ups per row, not an object per row."""
    if retention not in RETENTIONS:
        raise FeatxError(f"retention {retention!r}: expected one of {', '.join(RETENTIONS)}")
    old_roots = _old_roots(old, fresh) if old is not None else []
    keys = _objects(old.keys) if old is not None else np.empty(0, dtype=object)
    paths = _objects(old.paths) if old is not None else np.empty(0, dtype=object)
    row_root = np.asarray(old.row_roots, dtype=np.int64) if old is not None else np.empty(0, dtype=np.int64)
    is_ours = np.array([root == fresh.root for root in old_roots], dtype=bool)[row_root] if len(keys) else \
        np.zeros(0, dtype=bool)
    ours = np.flatnonzero(is_ours)
    present = set(fresh.paths).union(path for path, _ in fresh.failed)
    computed = set(fresh.keys)
    unseen = ours[~np.fromiter(map(present.__contains__, paths[ours].tolist()), dtype=bool, count=len(ours))]
    missing = unseen[~np.fromiter(map(computed.__contains__, keys[unseen].tolist()), dtype=bool, count=len(unseen))]
    unread = tuple(folder.rstrip("/") + "/" for folder in fresh.unread)
    under = np.array([bool(unread) and path.startswith(unread) for path in paths[missing].tolist()], dtype=bool)
    held, gone = missing[under], missing[~under]  # held: not seen, kept as they are
    carried = np.concatenate([gone if retention == "add" else missing[:0], held])
    others = missing[:0] if retention == "prune" else np.flatnonzero(~is_ours)
    if max_rows is not None:
        others, carried = _bound(others, carried, max_rows - len(fresh.keys))
    kept_keys = computed.union(keys[others].tolist(), keys[carried].tolist())
    if retention == "mirror":
        lost = len(gone) - sum(map(kept_keys.__contains__, keys[gone].tolist()))
        if lost > drop_limit(len(keys)):
            raise OptionError("{path}: this run would drop {lost} rows of files gone from {root} (more than {limit} "
                              "of the store's {n} rows); nothing was changed: check the data path, or pass "
                              "{retention=prune} to mirror {root} exactly", path=old.path, lost=lost, root=fresh.root,
                              limit=drop_limit(len(keys)), n=len(keys))
    kept_roots = [] if retention == "prune" else [root for root in old_roots if root != fresh.root]
    plan = _assemble(old, old_roots, kept_roots, fresh, others, carried)
    plan.dropped = len(keys) - sum(map(kept_keys.__contains__, keys.tolist()))
    return plan


def _bound(others: np.ndarray, carried: np.ndarray, room: int) -> tuple[np.ndarray, np.ndarray]:
    """At most `room` rows of other data and of files gone from this data, the oldest dropped first."""
    room = max(0, room)
    carried = carried[max(0, len(carried) - room):]
    room -= len(carried)
    return others[max(0, len(others) - room):], carried


def _assemble(old, old_roots: list[str], kept_roots: list[str], fresh: DataRows, others: np.ndarray,
              carried: np.ndarray) -> SealPlan:
    """Rows grouped by root, roots in the order they came into the store (this data last when it is new): the rows
    of each other data in their old order, then this data's rows followed by the rows `carried` over."""
    order = list(dict.fromkeys([*old_roots, fresh.root]))
    position = {root: i for i, root in enumerate(order)}
    others_at = np.array([position[root] for root in old_roots], dtype=np.int64)[np.asarray(old.row_roots)[others]] \
        if len(others) else np.empty(0, dtype=np.int64)
    others = others[np.argsort(others_at, kind="stable")]
    others_at = np.sort(others_at, kind="stable")
    counts = np.bincount(others_at, minlength=len(order))
    counts[position[fresh.root]] = len(fresh.keys) + len(carried)
    failures = _kept_failures(old, old_roots, set(kept_roots), fresh)
    failing = {failure.root for failure in failures}
    roots = [root for root in order if counts[position[root]] or root in failing]
    index = {root: i for i, root in enumerate(roots)}
    failures.sort(key=lambda failure: index[failure.root])  # grouped by root too (a stable sort)
    blocks, lengths, start = [], [], 0
    for root in roots:
        if root == fresh.root:
            start = sum(lengths)
            block = np.concatenate([np.full(len(fresh.keys), -1, dtype=np.int64), carried])
        else:
            lo, hi = np.searchsorted(others_at, [position[root], position[root] + 1])
            block = others[lo:hi]
        blocks.append(block.astype(np.int64))
        lengths.append(len(block))
    old_rows = np.concatenate(blocks) if blocks else np.empty(0, dtype=np.int64)
    row_roots = np.repeat(np.arange(len(roots), dtype=np.int32), lengths)
    data = np.arange(start, start + len(fresh.keys))
    classes = _classes(old, len(others) + len(carried), fresh)
    labels, targets = _labels(old, old_rows, data, classes, fresh, roots, row_roots)
    return SealPlan(
        roots=roots,
        row_roots=row_roots,
        keys=_column(old.keys if old is not None else (), fresh.keys, old_rows, data),
        paths=_column(old.paths if old is not None else (), fresh.paths, old_rows, data),
        splits=_column(old.splits if old is not None else (), fresh.splits, old_rows, data),
        classes=classes,
        labels=labels,
        targets=targets,
        failed=[failure.entry for failure in failures],
        failed_roots=np.array([index[failure.root] for failure in failures], dtype=np.int32),
        data_rows=data,
        old_rows=old_rows,
        data_stats=fresh.stats,
        failed_keys=[failure.key for failure in failures],
        old_failed=np.array([failure.old for failure in failures], dtype=np.int64),
        data_failed_stats=fresh.failed_stats,
        other={root: int(counts[position[root]]) for root in roots if root != fresh.root and counts[position[root]]},
    )
def _column(old_values, fresh_values: list, old_rows: np.ndarray, data: np.ndarray) -> list:
    """One column of the plan (keys, paths or splits): the old store's values of the rows carried over, this call's
    values at its rows."""
    out = np.empty(len(old_rows), dtype=object)
    carried = old_rows >= 0
    if carried.any():
        out[carried] = _objects(old_values)[old_rows[carried]]
    if len(data):
        out[data[0]:data[-1] + 1] = _objects(fresh_values)
    return out.tolist()


class _Failure(NamedTuple):
    """One failure of a plan: its data root, (path, reason), content key ('' when none), and the old store's
    failure it is carried over from (-1: the call's)."""

    root: str
    entry: tuple[str, str]
    key: str
    old: int


def _kept_failures(old, old_roots: list[str], kept_roots: set[str], fresh: DataRows) -> list[_Failure]:
    """The failures of the other data kept, then this call's."""
    kept = []
    if old is not None:
        for i, (r, failure, key) in enumerate(zip(old.failed_roots, old.failed, old.failed_keys)):
            if old_roots[r] in kept_roots:
                kept.append(_Failure(old_roots[r], tuple(failure), str(key), i))
    keys = fresh.failed_keys or [""] * len(fresh.failed)
    return kept + [_Failure(fresh.root, tuple(failure), key, -1) for failure, key in zip(fresh.failed, keys)]


def _classes(old, kept_old: int, fresh: DataRows) -> list[str]:
    """This data's classes when no old row stays (`kept_old` rows do: a store of one data lists exactly its
    classes); else the old classes in their order, then this data's new ones, so that extracting several data in
    turn never renumbers a label (a class left without rows costs one name)."""
    if not kept_old:
        return list(fresh.classes)
    return list(old.classes) + [c for c in fresh.classes if c not in old.classes]


def _labels(old, old_rows: np.ndarray, data: np.ndarray, classes: list[str], fresh: DataRows, roots: list[str],
            row_roots: np.ndarray) -> tuple[np.ndarray | None, np.ndarray | None]:
    """(labels, None), or (None, targets) when the rows hold regression targets; one store holds one kind. A row's
    label is its class name's index in `classes`."""
    carried = old_rows >= 0
    kept = old_rows[carried]
    old_targets = None if old is None else old.targets
    regression = fresh.targets is not None or (
        old_targets is not None and bool((~np.isnan(np.asarray(old_targets, dtype=np.float64)[kept])).any()))
    index = {c: i for i, c in enumerate(classes)}
    labels = np.full(len(old_rows), -1, dtype=np.int64)
    if old is not None and old_targets is None and len(kept):
        table = np.array([index[c] for c in old.classes] or [-1], dtype=np.int64)
        old_labels = np.asarray(old.labels, dtype=np.int64)[kept]
        named = (old_labels >= 0) & (old_labels < len(old.classes))
        labels[carried] = np.where(named, table[np.where(named, old_labels, 0)], -1)
    if fresh.labels is not None and len(data):
        fresh_labels = np.asarray(fresh.labels, dtype=np.int64)
        table = np.array([index[c] for c in fresh.classes] or [-1], dtype=np.int64)
        labels[data] = np.where(fresh_labels >= 0, table[np.where(fresh_labels >= 0, fresh_labels, 0)], -1)
    if not regression:
        return labels, None
    labelled = np.flatnonzero(labels >= 0)
    if len(labelled):
        where = old.path if old is not None else "the store"
        root = roots[row_roots[labelled[0]]]
        raise OptionError("{where}: rows of {root} have class labels and rows of {fresh} regression targets; one store "
                          "holds one kind: choose another {output}, or pass {retention=prune}", where=where,
                          root=root or "the store", fresh=fresh.root)
    targets = np.full(len(old_rows), np.nan, dtype=np.float64)
    if old_targets is not None:
        targets[carried] = np.asarray(old_targets, dtype=np.float64)[kept]
    if fresh.targets is not None:
        targets[data] = np.asarray(fresh.targets, dtype=np.float64)
    return None, targets


def holds_as_is(old, fresh: DataRows, max_rows: int | None = None) -> bool:
    """True when `old` is a store of this data alone that already holds exactly `fresh`: then `merge` under any
    retention would plan `old` as it is (`holds`). Array comparisons instead of a merge row by row, for the
    unchanged rerun of a large store; False says nothing (merge decides)."""
    n = len(fresh.keys)
    if list(old.roots) != [fresh.root] or len(old.keys) != n or fresh.unread:
        return False
    if [tuple(f) for f in old.failed] != fresh.failed or list(old.failed_keys) != list(fresh.failed_keys):
        return False
    if (max_rows is not None and max_rows < n) or list(old.classes) != list(fresh.classes):
        return False
    if fresh.targets is not None:
        same_labels = old.targets is not None and np.array_equal(old.targets, np.asarray(fresh.targets, np.float64))
    else:
        same_labels = old.targets is None and np.array_equal(old.labels, np.asarray(fresh.labels, np.int64))
    return same_labels and all(
        np.array_equal(np.asarray(mine, dtype=object), np.asarray(theirs, dtype=object))
        for mine, theirs in ((old.keys, fresh.keys), (old.paths, fresh.paths), (old.splits, fresh.splits))
    )


def holds(old, plan: SealPlan) -> bool:
    """Whether the store `old` holds exactly the rows, roots, labels, classes and failures of `plan`."""
    same_labels = (
        np.array_equal(old.targets, plan.targets)
        if plan.targets is not None
        else old.targets is None and np.array_equal(old.labels, plan.labels)
    )
    return (
        same_labels
        and list(old.roots) == plan.roots
        and np.array_equal(old.row_roots, plan.row_roots)
        and list(old.keys) == plan.keys
        and list(old.paths) == plan.paths
        and list(old.splits) == plan.splits
        and old.classes == plan.classes
        and [tuple(f) for f in old.failed] == plan.failed
        and list(old.failed_keys) == plan.failed_keys
        and np.array_equal(old.failed_roots, plan.failed_roots)
    )
