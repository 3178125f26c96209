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

import math
import os
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from .choices import RETENTIONS
from .errors import FeatxError
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
    (regression); `failed` are (path, reason) of its files that gave no row."""

    root: str
    keys: list[str]
    paths: list[str]
    splits: list[str]
    classes: list[str]
    labels: list[int] | None
    targets: list[float] | None
    failed: list[tuple[str, str]]
    unread: list[str] = field(default_factory=list)  # folders of the data that could not be listed


def data_rows(root: str, source, keys, available, failures: dict[str, str]) -> DataRows:
    """The rows of `source` (a featx.sources.Source) whose content key is in `available`, in source order; the
    other items are failures (unreadable, a recorded decode failure, or not computed), after the folders the
    source could not read."""
    rows, failed = [], list(source.failed)
    for item, key in zip(source.items, keys):
        if key is None:
            failed.append((item.relpath, unreadable_reason(item.path)))
        elif key in available:
            rows.append((item, key))
        else:
            failed.append((item.relpath, failures.get(key, "not computed")))
    regression = source.task == "regression"
    return DataRows(
        root=root,
        keys=[key for _, key in rows],
        paths=[item.relpath for item, _ in rows],
        splits=[item.split for item, _ in rows],
        classes=list(source.classes),
        labels=None if regression else [item.label for item, _ in rows],
        targets=[item.target for item, _ in rows] if regression else None,
        failed=failed,
        unread=[folder for folder, _ in source.failed],
    )


@dataclass
class SealPlan:
    """Everything the sealed store holds besides features, in row order, and what changed.

    `data_rows` are the plan's rows of the call's data (in its order); `dropped` counts old rows whose content the
    sealed store no longer holds; `other` maps each other data whose rows are kept to their count."""

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
    dropped: int = 0
    other: dict[str, int] = field(default_factory=dict)


class _Row(NamedTuple):
    root: str
    path: str
    key: str
    split: str
    label: str | None  # class name
    target: float  # nan without one


def _old_rows(old, roots: list[str]) -> list[_Row]:
    targets = old.targets
    return [
        _Row(roots[r], str(path), str(key), str(split),
             old.classes[label] if targets is None and 0 <= label < len(old.classes) else None,
             float(targets[i]) if targets is not None else math.nan)
        for i, (r, path, key, split, label) in enumerate(zip(old.row_roots, old.paths, old.keys, old.splits, old.labels))
    ]


def _fresh_rows(fresh: DataRows) -> list[_Row]:
    n = len(fresh.keys)
    labels = fresh.labels if fresh.labels is not None else [-1] * n
    targets = fresh.targets if fresh.targets is not None else [math.nan] * n
    return [
        _Row(fresh.root, path, key, split, fresh.classes[label] if label >= 0 else None, float(target))
        for path, key, split, label, target in zip(fresh.paths, fresh.keys, fresh.splits, labels, targets)
    ]


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


def merge(old, fresh: DataRows, retention: str = "mirror", max_rows: int | None = None) -> SealPlan:
    """The plan of the store sealed from `old` (a featx.store.Store's metadata, or None) and this call's `fresh`
    rows under `retention` (see the module docstring); `max_rows` bounds a private cache. FeatxError when
    mirroring would drop more than `drop_limit` rows, or when the data's labels cannot share one store."""
    if retention not in RETENTIONS:
        raise FeatxError(f"retention {retention!r}: expected one of {', '.join(RETENTIONS)}")
    old_roots = _old_roots(old, fresh) if old is not None else []
    old_rows = _old_rows(old, old_roots) if old is not None else []
    ours = [row for row in old_rows if row.root == fresh.root]
    others = [] if retention == "prune" else [row for row in old_rows if row.root != fresh.root]
    present = set(fresh.paths) | {path for path, _ in fresh.failed}
    computed = set(fresh.keys)
    unread = tuple(folder.rstrip("/") + "/" for folder in fresh.unread)
    missing = [row for row in ours if row.path not in present and row.key not in computed]
    held = [row for row in missing if unread and row.path.startswith(unread)]  # not seen: kept as they are
    gone = [row for row in missing if not (unread and row.path.startswith(unread))]
    carried = (gone if retention == "add" else []) + held
    new = _fresh_rows(fresh)
    if max_rows is not None:
        others, carried = _bound(others, carried, max_rows - len(new))
    kept_keys = {row.key for row in [*others, *carried, *new]}
    if retention == "mirror":
        lost = [row for row in gone if row.key not in kept_keys]
        if len(lost) > drop_limit(len(old_rows)):
            raise FeatxError(
                f"{old.path}: this run would drop {len(lost)} rows of files gone from {fresh.root} (more than "
                f"{drop_limit(len(old_rows))} of the store's {len(old_rows)} rows); nothing was changed: check the "
                f"data path, or pass --prune to mirror {fresh.root} exactly"
            )
    kept_roots = [] if retention == "prune" else [root for root in old_roots if root != fresh.root]
    plan = _assemble(old, old_roots, kept_roots, fresh, others, [*new, *carried])
    plan.dropped = sum(1 for row in old_rows if row.key not in kept_keys)
    return plan


def _bound(others: list[_Row], carried: list[_Row], room: int) -> tuple[list[_Row], list[_Row]]:
    """At most `room` rows of other data and of files gone from this data, the oldest dropped first."""
    room = max(0, room)
    carried = carried[max(0, len(carried) - room):]
    room -= len(carried)
    return others[max(0, len(others) - room):], carried


def _assemble(old, old_roots: list[str], kept_roots: list[str], fresh: DataRows, others: list[_Row],
              ours: list[_Row]) -> SealPlan:
    """Rows grouped by root, roots in the order they came into the store (this data last when it is new)."""
    order = list(dict.fromkeys([*old_roots, fresh.root]))
    by_root: dict[str, list[_Row]] = {root: [] for root in order}
    for row in others:
        by_root[row.root].append(row)
    by_root[fresh.root] = ours
    failures = _kept_failures(old, old_roots, set(kept_roots), fresh)
    roots = [root for root in order if by_root[root] or any(r == root for r, _ in failures)]
    rows = [row for root in roots for row in by_root[root]]
    index = {root: i for i, root in enumerate(roots)}
    failures.sort(key=lambda failure: index[failure[0]])  # grouped by root too (a stable sort)
    classes = _classes(old, [*others, *ours[len(fresh.keys):]], fresh)
    start = sum(len(by_root[root]) for root in roots[: index[fresh.root]]) if fresh.root in index else 0
    labels, targets = _labels(rows, classes, fresh, old)
    return SealPlan(
        roots=roots,
        row_roots=np.array([index[row.root] for row in rows], dtype=np.int32),
        keys=[row.key for row in rows],
        paths=[row.path for row in rows],
        splits=[row.split for row in rows],
        classes=classes,
        labels=labels,
        targets=targets,
        failed=[failure for _, failure in failures],
        failed_roots=np.array([index[root] for root, _ in failures], dtype=np.int32),
        data_rows=np.arange(start, start + len(fresh.keys)),
        other={root: len(by_root[root]) for root in roots if root != fresh.root and by_root[root]},
    )


def _kept_failures(old, old_roots: list[str], kept_roots: set[str], fresh: DataRows) -> list[tuple[str, tuple[str, str]]]:
    """(root, (path, reason)): the failures of the other data kept, then this call's."""
    kept = []
    if old is not None:
        for r, failure in zip(old.failed_roots, old.failed):
            if old_roots[r] in kept_roots:
                kept.append((old_roots[r], tuple(failure)))
    return kept + [(fresh.root, tuple(failure)) for failure in fresh.failed]


def _classes(old, kept_old: list[_Row], fresh: DataRows) -> list[str]:
    """This data's classes when no old row stays (a store of one data lists exactly its classes); else the old
    classes in their order, then this data's new ones, so that extracting several data in turn never renumbers a
    label (a class left without rows costs one name)."""
    if not kept_old:
        return list(fresh.classes)
    return list(old.classes) + [c for c in fresh.classes if c not in old.classes]


def _labels(rows: list[_Row], classes: list[str], fresh: DataRows, old) -> tuple[np.ndarray | None, np.ndarray | None]:
    """(labels, None), or (None, targets) when the rows hold regression targets; one store holds one kind."""
    regression = fresh.targets is not None or any(not math.isnan(row.target) for row in rows)
    if not regression:
        index = {c: i for i, c in enumerate(classes)}
        return np.array([index[row.label] if row.label is not None else -1 for row in rows], dtype=np.int64), None
    labelled = next((row for row in rows if row.label is not None), None)
    if labelled is not None:
        where = old.path if old is not None else "the store"
        raise FeatxError(
            f"{where}: rows of {labelled.root or 'the store'} have class labels and rows of "
            f"{fresh.root} regression targets; one store holds one kind: choose another -o, or pass --prune"
        )
    return None, np.array([row.target for row in rows], dtype=np.float64)


def holds_as_is(old, fresh: DataRows, max_rows: int | None = None) -> bool:
    """True when `old` is a store of this data alone that already holds exactly `fresh`: then `merge` under any
    retention would plan `old` as it is (`holds`). Array comparisons instead of a merge row by row, for the
    unchanged rerun of a large store; False says nothing (merge decides)."""
    n = len(fresh.keys)
    if list(old.roots) != [fresh.root] or len(old.keys) != n or old.failed or fresh.failed or fresh.unread:
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
        and np.array_equal(old.failed_roots, plan.failed_roots)
    )
