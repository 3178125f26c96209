"""The HDF5 store: schema v1 as written, read back by h5py alone, and the crash-safe writer's semantics."""
from __future__ import annotations

import json
import shutil

import h5py
import numpy as np
import pytest

from featx.errors import FeatxError
from featx.store import SCHEMA_VERSION, open_store, read_rows, write_store
from featx.retention import DataRows
from featx.writer import StoreWriter

CONFIG = {"backbone": "resnet18", "weights": "none", "taps": ["avgpool"]}


def _keys(n, offset=0):
    return [f"{i + offset:064x}" for i in range(n)]


def _small_store(path, n=6, d=4, targets=None):
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(n, d)).astype(np.float32)
    write_store(
        path, config=CONFIG, keys=_keys(n), paths=[f"c{i % 2}/img {i}é.png" for i in range(n)],
        labels=None if targets is not None else [i % 2 for i in range(n)], targets=targets,
        splits=["train"] * (n - 2) + ["val"] * 2, classes=["ants", "bees"], features={"avgpool": feats},
        failed=[("broken.jpg", "truncated")],
    )
    return feats


def test_schema_readable_without_featx(tmp_path):
    path = tmp_path / "s.h5"
    feats = _small_store(path)
    with h5py.File(path, "r") as h5:
        assert h5.attrs["featx_schema"] == SCHEMA_VERSION
        assert json.loads(h5.attrs["config"]) == CONFIG
        assert h5["items/key"].dtype == np.dtype("S64")
        assert h5["items/path"][2].decode() == "c0/img 2é.png"
        assert h5["items/label"][...].tolist() == [0, 1, 0, 1, 0, 1]
        assert h5["classes"].asstr()[...].tolist() == ["ants", "bees"]
        assert h5["items/split"].asstr()[-1] == "val"
        np.testing.assert_array_equal(h5["features/avgpool"][...], feats)
        assert h5["features/avgpool"].chunks[1] == 4
        assert h5["failed/reason"].asstr()[0] == "truncated"
    assert not list(tmp_path.glob(".*tmp*"))


def test_open_store_round_trip(tmp_path):
    path = tmp_path / "s.h5"
    feats = _small_store(path)
    with open_store(path) as st:
        assert len(st) == 6 and st.taps == ["avgpool"] and st.classes == ["ants", "bees"]
        assert st.targets is None and st.failed == [("broken.jpg", "truncated")]
        np.testing.assert_array_equal(st.features("avgpool", [5, 0, 5]), feats[[5, 0, 5]])
        np.testing.assert_array_equal(st.features("avgpool", st.splits == "val"), feats[4:])
        chunks = [arr for _, arr in st.iter_features("avgpool", chunk_rows=4)]
        np.testing.assert_array_equal(np.concatenate(chunks), feats)
        assert st.summary()["splits"] == {"train": 4, "val": 2}
        with pytest.raises(FeatxError, match="holds avgpool"):
            st.features("layer3")


def test_regression_targets(tmp_path):
    path = tmp_path / "r.h5"
    _small_store(path, targets=[0.5, 1.5, 2.5, 3.5, 4.5, 5.5])
    with open_store(path) as st:
        assert st.targets.tolist() == [0.5, 1.5, 2.5, 3.5, 4.5, 5.5]
        assert (st.labels == -1).all()
        assert st.summary()["task"] == "regression"


def test_read_rows_sparse_and_dense(tmp_path):
    with h5py.File(tmp_path / "x.h5", "w") as h5:
        ds = h5.create_dataset("x", data=np.arange(1000).reshape(500, 2))
        for rows in ([3, 1, 2], [0, 499, 250, 0], []):
            np.testing.assert_array_equal(read_rows(ds, np.array(rows, dtype=int)), np.arange(1000).reshape(500, 2)[rows])


@pytest.mark.parametrize(
    "content, match",
    [(b"", "not a readable HDF5"), (b"\x89HDF\r\n\x1a\n" + b"\0" * 100, "not a readable HDF5"), (b"hello", "not a readable HDF5")],
)
def test_open_store_rejects_garbage(tmp_path, content, match):
    path = tmp_path / "bad.h5"
    path.write_bytes(content)
    with pytest.raises(FeatxError, match=match):
        open_store(path)


def test_open_store_rejects_foreign_and_newer(tmp_path):
    foreign = tmp_path / "foreign.h5"
    with h5py.File(foreign, "w") as h5:
        h5["X"] = np.zeros((3, 2))
    with pytest.raises(FeatxError, match="not a featx store"):
        open_store(foreign)
    newer = tmp_path / "newer.h5"
    _small_store(newer)
    with h5py.File(newer, "a") as h5:
        h5.attrs["featx_schema"] = SCHEMA_VERSION + 1
    with pytest.raises(FeatxError, match="newer"):
        open_store(newer)
    with pytest.raises(FeatxError, match="no such store"):
        open_store(tmp_path / "missing.h5")


def test_open_store_rejects_inconsistent_rows(tmp_path):
    path = tmp_path / "s.h5"
    _small_store(path)
    with h5py.File(path, "a") as h5:
        del h5["features/avgpool"]
        h5["features/avgpool"] = np.zeros((3, 4), dtype=np.float32)
    with pytest.raises(FeatxError, match="damaged"):
        open_store(path)


def _rows(keys, paths=None):
    return DataRows(root="/data", keys=keys, paths=paths or [f"p{k[-2:]}" for k in keys], splits=[""] * len(keys),
                    classes=["a"], labels=[0] * len(keys), targets=None, failed=[])


def test_writer_commit_seal_and_reuse(tmp_path):
    out = tmp_path / "s.h5"
    keys = _keys(5)
    rows = np.arange(20, dtype=np.float32).reshape(5, 4)
    with StoreWriter(out, CONFIG, "cfg") as w:
        w.commit(keys[:3], {"t": rows[:3]})
        w.commit(keys[3:], {"t": rows[3:]})
        assert len(list(w.parts.glob("seg-*.h5"))) == 2
        w.seal(w.plan(_rows(keys)), ["t"])
    assert not out.with_name("s.h5.parts").exists()
    # a second run reuses every row, reorders and drops without recomputing
    with StoreWriter(out, CONFIG, "cfg") as w:
        assert set(w.available) == set(keys)
        assert w.is_unchanged(w.plan(_rows(keys)))
        new_order = [keys[4], keys[0], keys[0]]
        assert not w.is_unchanged(w.plan(_rows(new_order)))
        w.seal(w.plan(_rows(new_order)), ["t"])
    with open_store(out) as st:
        np.testing.assert_array_equal(st.features("t"), rows[[4, 0, 0]])


def test_writer_resumes_committed_segments_after_crash(tmp_path):
    out = tmp_path / "s.h5"
    keys = _keys(4)
    rows = np.ones((4, 3), dtype=np.float32)
    with StoreWriter(out, CONFIG, "cfg") as w:
        w.commit(keys[:2], {"t": rows[:2]})
        (w.parts / "seg-half-written.tmp").write_bytes(b"partial")  # what a kill mid-write leaves
    with StoreWriter(out, CONFIG, "cfg") as w:
        assert set(w.available) == set(keys[:2])
        assert not list(w.parts.glob("*.tmp"))


def test_writer_refuses_other_config_and_concurrent_writer(tmp_path):
    out = tmp_path / "s.h5"
    with StoreWriter(out, CONFIG, "cfg") as w:
        w.commit(_keys(1), {"t": np.zeros((1, 2), np.float32)})
        w.seal(w.plan(_rows(_keys(1))), ["t"])
    with pytest.raises(FeatxError, match="another config"):
        StoreWriter(out, {"backbone": "vgg11"}, "other").__enter__()
    with StoreWriter(out, CONFIG, "cfg"):
        with pytest.raises(FeatxError, match="being written by another"):
            StoreWriter(out, CONFIG, "cfg").__enter__()
    with StoreWriter(out, {"backbone": "vgg11"}, "other", overwrite=True) as w:
        assert w.available == {}
    with open_store(out) as st:  # --overwrite keeps the old store until a new one is sealed
        assert len(st) == 1


def test_shard_writers_share_the_lock_and_the_last_one_seals(tmp_path):
    out = tmp_path / "s.h5"
    keys = _keys(4)
    rows = np.arange(12, dtype=np.float32).reshape(4, 3)
    a = StoreWriter(out, CONFIG, "cfg", subfolder="shard-0-of-2").__enter__()
    b = StoreWriter(out, CONFIG, "cfg", subfolder="shard-1-of-2").__enter__()
    with pytest.raises(FeatxError, match="being written by another"):
        StoreWriter(out, CONFIG, "cfg").__enter__()  # a one-process run waits for the shards
    (a.segments / "seg-in-flight.tmp").write_bytes(b"partial")
    with StoreWriter(out, CONFIG, "cfg", subfolder="shard-1-of-2"):  # a restarted shard cleans only its own folder
        pass
    assert (a.segments / "seg-in-flight.tmp").exists()
    a.commit(keys[:2], {"t": rows[:2]})
    b.commit(keys[2:], {"t": rows[2:]})
    assert set(b.available) == set(keys[2:])
    a.__exit__(None, None, None)
    assert b.exclusive()
    b.refresh()
    assert set(b.available) == set(keys)
    b.seal(b.plan(_rows(keys)), ["t"])
    b.__exit__(None, None, None)
    with open_store(out) as st:
        np.testing.assert_array_equal(st.features("t"), rows)
    assert not out.with_name("s.h5.parts").exists()


def test_shard_finds_the_store_sealed_by_another_shard(tmp_path):
    out = tmp_path / "s.h5"
    with StoreWriter(out, CONFIG, "cfg", subfolder="shard-0-of-2") as w:
        shutil.rmtree(w.parts)  # what the shard that sealed first leaves: no parts folder
        assert not w.exclusive()


def test_one_process_run_reuses_segments_of_unfinished_shards(tmp_path):
    out = tmp_path / "s.h5"
    with StoreWriter(out, CONFIG, "cfg", subfolder="shard-1-of-3") as w:
        w.commit(_keys(2), {"t": np.ones((2, 2), np.float32)})
        (w.segments / "seg-x.tmp").write_bytes(b"partial")
    with StoreWriter(out, CONFIG, "cfg") as w:
        assert set(w.available) == set(_keys(2))
        assert not list(w.parts.glob("**/*.tmp"))
        assert not w.is_unchanged(w.plan(_rows(_keys(2))))
