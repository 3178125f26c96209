"""Which rows a sealed store keeps (featx.retention.merge), on plans alone: the rule, case by case."""
from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest

from featx.errors import FeatxError
from featx.retention import DataRows, data_root, drop_limit, holds, holds_as_is, merge
from featx.store import open_store, write_store
from featx.writer import StoreWriter


def rows(root, files: dict[str, str], classes=("ants", "bees"), failed=()) -> DataRows:
    """A data's rows: {relpath: content key}; the label is the path's first folder."""
    paths = list(files)
    return DataRows(root=root, keys=[files[p] for p in paths], paths=paths, splits=[""] * len(paths),
                    classes=list(classes), labels=[list(classes).index(p.split("/")[0]) for p in paths], targets=None,
                    failed=list(failed))


def sealed(plan) -> SimpleNamespace:
    """What a store sealed from `plan` reads back as (the metadata `merge` uses)."""
    return SimpleNamespace(
        path="s.h5", roots=plan.roots, row_roots=plan.row_roots, keys=np.array(plan.keys, dtype=object),
        paths=np.array(plan.paths, dtype=object), splits=np.array(plan.splits, dtype=object), classes=plan.classes,
        labels=plan.labels if plan.labels is not None else np.full(len(plan.keys), -1), targets=plan.targets,
        failed=plan.failed, failed_roots=plan.failed_roots, failed_keys=np.array(plan.failed_keys, dtype=object),
    )


def files(n, prefix="k", folder="ants"):
    return {f"{folder}/{i}.png": f"{prefix}{i}" for i in range(n)}


def test_a_second_data_adds_its_rows_and_keeps_the_first():
    first = merge(None, rows("/a", files(4)))
    plan = merge(sealed(first), rows("/b", files(3, "b", "bees")))
    assert plan.roots == ["/a", "/b"] and len(plan.keys) == 7 and plan.dropped == 0
    assert plan.other == {"/a": 4} and plan.data_rows.tolist() == [4, 5, 6]
    assert [plan.roots[r] for r in plan.row_roots] == ["/a"] * 4 + ["/b"] * 3


def test_mirror_drops_gone_files_of_its_data_within_the_limit_and_reports_them():
    store = sealed(merge(None, rows("/a", files(10))))
    now = files(10)
    del now["ants/3.png"]
    now["ants/new.png"] = "k-new"
    now["ants/0.png"] = "k0-changed"  # same path, new content: the old row is replaced
    plan = merge(store, rows("/a", now))
    assert plan.dropped == 2 and "k3" not in plan.keys and "k0" not in plan.keys
    assert plan.paths == list(now) and plan.other == {}


def test_mirror_refuses_dropping_more_than_a_small_share_naming_data_and_count():
    store = sealed(merge(None, rows("/a", files(60))))
    assert drop_limit(60) == 6
    plan = merge(store, rows("/a", dict(list(files(60).items())[6:])))  # 6 gone: allowed
    assert plan.dropped == 6
    with pytest.raises(FeatxError, match=r"s\.h5: this run would drop 7 rows of files gone from /a \(more than 6 of "
                                         r"the store's 60 rows\).*retention='prune'"):
        merge(store, rows("/a", dict(list(files(60).items())[7:])))
    assert merge(store, rows("/a", dict(list(files(60).items())[7:])), "prune").dropped == 7


def test_renamed_and_moved_files_keep_their_content_and_drop_nothing():
    store = sealed(merge(None, rows("/a", files(8))))
    now = {("bees/moved.png" if p == "ants/1.png" else p): k for p, k in files(8).items()}
    for retention in ("mirror", "add"):
        plan = merge(store, rows("/a", now), retention)
        assert plan.dropped == 0 and sorted(plan.keys) == sorted(files(8).values())  # each content once
        assert plan.labels[plan.paths.index("bees/moved.png")] == plan.classes.index("bees")


def test_prune_keeps_this_data_alone():
    store = sealed(merge(sealed(merge(None, rows("/a", files(4)))), rows("/b", files(3, "b"), failed=[("x", "bad")])))
    plan = merge(store, rows("/a", files(2)), "prune")
    assert plan.roots == ["/a"] and plan.keys == ["k0", "k1"] and plan.dropped == 5 and plan.failed == []


def test_add_keeps_rows_of_gone_files_but_replaces_changed_ones():
    store = sealed(merge(sealed(merge(None, rows("/train", files(5, "t")))), rows("/few", files(3, "f"))))
    plan = merge(store, rows("/few", {"ants/0.png": "f0-new", "ants/9.png": "f9"}), "add")
    few = [(p, k) for p, k, r in zip(plan.paths, plan.keys, plan.row_roots) if plan.roots[r] == "/few"]
    assert few == [("ants/0.png", "f0-new"), ("ants/9.png", "f9"), ("ants/1.png", "f1"), ("ants/2.png", "f2")]
    assert plan.dropped == 1 and plan.other == {"/train": 5}  # only f0's old content is gone
    assert plan.data_rows.tolist() == [5, 6]  # this call's rows, in its order


def test_a_private_cache_bound_drops_the_oldest_other_data_first_never_this_calls_rows():
    store = None
    for name in ("/one", "/two", "/three"):
        store = sealed(merge(store, rows(name, files(4, name)), "add", max_rows=10))
    assert store.roots == ["/one", "/two", "/three"] and len(store.keys) == 10  # two rows of /one went first
    assert [store.roots[r] for r in store.row_roots].count("/one") == 2
    plan = merge(store, rows("/four", files(12, "/four")), "add", max_rows=12)
    assert plan.roots == ["/four"] and len(plan.keys) == 12 and plan.dropped == 10


def test_alternating_data_keep_the_store_as_it_is():
    """Extracting a, b, a, b... reorders nothing: each rerun finds the store holding exactly its plan."""
    a, b = rows("/a", files(3)), rows("/b", files(2, "b", "cats"), classes=("cats",))
    store = sealed(merge(sealed(merge(None, a)), b))
    for data in (a, b, a):
        assert holds(store, merge(store, data))
    assert store.classes == ["ants", "bees", "cats"]  # "bees" has no row: kept all the same, in its place


def test_one_data_store_equals_a_clean_extraction_of_it():
    store = sealed(merge(None, rows("/a", files(3), classes=("ants", "bees"))))
    now = rows("/a", {**files(3), "aardvarks/x.png": "kx"}, classes=("aardvarks", "ants", "bees"))
    assert holds(sealed(merge(store, now)), merge(None, now))


def test_rows_whose_root_was_not_recorded_are_adopted_only_by_their_own_data(tmp_path):
    path = tmp_path / "old.h5"
    write_store(path, config={}, keys=["k0", "k1"], paths=["ants/0.png", "ants/1.png"], labels=[0, 0],
                classes=["ants"], features={"t": np.zeros((2, 2), np.float32)})
    with open_store(path) as old:
        assert old.roots == [""] and old.root_counts() == {"": 2}
        same = merge(old, rows("/a", {"ants/0.png": "k0", "ants/1.png": "k1", "ants/2.png": "k2"}))
        other = merge(old, rows("/b", files(2, "b", "bees")))
    assert same.roots == ["/a"] and same.dropped == 0 and len(same.keys) == 3
    assert other.roots == ["", "/b"] and other.other == {"": 2} and other.dropped == 0


def test_labels_and_regression_targets_do_not_share_a_store():
    store = sealed(merge(None, rows("/a", files(2))))
    regression = DataRows(root="/r", keys=["r0"], paths=["0.png"], splits=[""], classes=[], labels=None,
                          targets=[1.5], failed=[])
    with pytest.raises(FeatxError, match="rows of /a have class labels and rows of /r regression targets"):
        merge(store, regression)
    unlabelled = DataRows(root="/u", keys=["u0"], paths=["0.png"], splits=[""], classes=[], labels=[-1], targets=None,
                          failed=[])
    plan = merge(sealed(merge(None, regression)), unlabelled, "add")
    assert plan.targets[0] == 1.5 and math.isnan(plan.targets[1])


def test_failures_follow_their_data():
    first = merge(None, rows("/a", files(2), failed=[("ants/bad.png", "truncated")]))
    plan = merge(sealed(first), rows("/b", files(1, "b"), failed=[("ants/x.png", "empty")]))
    assert [(plan.roots[r], f) for r, f in zip(plan.failed_roots, plan.failed)] == [
        ("/a", ("ants/bad.png", "truncated")), ("/b", ("ants/x.png", "empty"))]
    again = merge(sealed(plan), rows("/a", files(2)))
    assert again.failed == [("ants/x.png", "empty")]


def test_data_root_is_the_resolved_path(tmp_path, monkeypatch):
    (tmp_path / "data").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    assert data_root("data") == data_root(tmp_path / "link") == str((tmp_path / "data").resolve())
    assert data_root("digits") == "digits"


def test_seal_writes_only_plans_the_writer_made(tmp_path):
    with StoreWriter(tmp_path / "s.h5", {}, "cfg") as writer:
        writer.commit(["k0"], {"t": np.zeros((1, 2), np.float32)})
        with pytest.raises(ValueError, match="only a plan made by StoreWriter.plan"):
            writer.seal(merge(None, rows("/a", {"ants/0.png": "k0"})), ["t"])
        writer.seal(writer.plan(rows("/a", {"ants/0.png": "k0"})), ["t"])
    with open_store(tmp_path / "s.h5") as st:
        assert st.roots == ["/a"] and st.root_counts() == {"/a": 1} and st.paths.tolist() == ["ants/0.png"]


def test_rows_under_an_unreadable_folder_are_kept_as_they_are():
    """A folder of the data that cannot be listed (permissions, a failing mount) is not a folder whose files are
    gone: its rows stay, whatever the retention; a folder whose name merely starts the same is not spared."""
    old = {**files(3, "a"), **files(3, "b", "bees"), **files(2, "c", "bees2")}
    classes = ("ants", "bees", "bees2")
    first = merge(None, rows("/a", old, classes))
    fresh = rows("/a", files(3, "a"), classes)
    fresh.unread = ["bees"]
    for retention in ("mirror", "prune", "add"):
        plan = merge(sealed(first), fresh, retention)
        assert sorted(plan.keys) == (["a0", "a1", "a2", "b0", "b1", "b2"] + (["c0", "c1"] if retention == "add" else []))
        assert plan.dropped == (0 if retention == "add" else 2)


def test_holds_as_is_only_where_every_retention_plans_the_store_as_it_is():
    """The array test of an unchanged rerun agrees with merge + holds: never True where a merge would change a row,
    and True for the plain rerun of a one-data store (classified, unlabelled or regression)."""
    base = files(6) | files(4, "b", "bees")
    store = sealed(merge(None, rows("/a", base)))
    regression = DataRows(root="/r", keys=["r0", "r1"], paths=["x/0.png", "x/1.png"], splits=["", ""], classes=[],
                          labels=None, targets=[0.5, 1.5], failed=[])
    unlabelled = DataRows(root="/u", keys=["u0"], paths=["0.png"], splits=[""], classes=[], labels=[-1],
                          targets=None, failed=[])
    renamed = dict(base)
    renamed["ants/renamed.png"] = renamed.pop("ants/0.png")
    changed = {**base, "ants/1.png": "k1-changed"}
    cases = {
        "same": (store, rows("/a", base)),
        "regression": (sealed(merge(None, regression)), regression),
        "unlabelled": (sealed(merge(None, unlabelled)), unlabelled),
        "renamed": (store, rows("/a", renamed)),
        "changed": (store, rows("/a", changed)),
        "one gone": (store, rows("/a", {p: k for p, k in base.items() if p != "bees/2.png"})),
        "one new": (store, rows("/a", {**base, "bees/new.png": "new"})),
        "other data": (sealed(merge(sealed(merge(None, rows("/b", files(2, "o")))), rows("/a", base))), rows("/a", base)),
        "failure": (store, rows("/a", base, failed=[("ants/x.png", "cannot read file")])),
        "classes": (store, rows("/a", base, classes=("ants", "bees", "wasps"))),
        "bounded": (store, rows("/a", base)),
    }
    for name, (old, fresh) in cases.items():
        max_rows = 5 if name == "bounded" else None
        fast = holds_as_is(old, fresh, max_rows)
        assert fast == (name in ("same", "regression", "unlabelled")), name
        for retention in ("mirror", "add", "prune"):
            try:
                slow = holds(old, merge(old, fresh, retention, max_rows))
            except FeatxError:
                slow = False
            assert not fast or slow, (name, retention)
