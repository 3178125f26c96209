"""Reading a store from other code: Store.batches (chunked, bounded), split -> (X, y), metadata and to_pandas."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from featx.errors import FeatxError
from featx.store import open_store, write_store

CONFIG = {"backbone": "resnet18", "weights": "none", "taps": ["avgpool", "layer4"], "pooling": "avg"}


def make_store(path, n=23, d=5, targets=None, root=None, dtype=np.float32):
    """A store of n rows: class i % 3 (the last row unlabelled), splits train/val/test, two taps."""
    rng = np.random.default_rng(1)
    feats = {"avgpool": rng.normal(size=(n, d)).astype(dtype), "layer4": rng.normal(size=(n, 2, 3, 3)).astype(dtype)}
    labels = None if targets is not None else [i % 3 for i in range(n - 1)] + [-1]
    write_store(path, config=CONFIG, keys=[f"{i:064x}" for i in range(n)], paths=[f"c{i % 3}/{i}.png" for i in range(n)],
                labels=labels, targets=targets, splits=[("train", "val", "test")[i % 3] for i in range(n)],
                classes=["ants", "bees", "wasps"], features=feats, root=root)
    return feats


def test_batches_cover_every_row_in_bounded_chunks(tmp_path):
    feats = make_store(tmp_path / "s.h5")
    with open_store(tmp_path / "s.h5") as st:
        got = list(st.batches("avgpool", size=4))
        assert [len(rows) for rows, _ in got] == [4, 4, 4, 4, 4, 3]
        np.testing.assert_array_equal(np.concatenate([rows for rows, _ in got]), np.arange(23))
        np.testing.assert_array_equal(np.concatenate([x for _, x in got]), feats["avgpool"])
        assert all(x.dtype == np.float32 for _, x in got)
        unpooled = list(st.batches("layer4", rows=slice(3, 11), size=3))
        assert [x.shape for _, x in unpooled] == [(3, 2, 3, 3), (3, 2, 3, 3), (2, 2, 3, 3)]
        np.testing.assert_array_equal(np.concatenate([x for _, x in unpooled]), feats["layer4"][3:11])
        assert next(st.batches("avgpool"))[1].shape == (23, 5)  # the default size holds a small store whole


@pytest.mark.parametrize("rows", [[20, 2, 2, -1, 7], slice(None, None, -3), "mask"])
def test_batches_follow_the_order_of_rows(tmp_path, rows):
    feats = make_store(tmp_path / "s.h5")["avgpool"]
    rows = np.arange(23) % 4 == 1 if isinstance(rows, str) else rows
    expected = np.arange(23)[rows] if not isinstance(rows, list) else np.array(rows) % 23
    with open_store(tmp_path / "s.h5") as st:
        got = list(st.batches("avgpool", rows=rows, size=2))
    np.testing.assert_array_equal(np.concatenate([r for r, _ in got]), expected)
    np.testing.assert_array_equal(np.concatenate([x for _, x in got]), feats[expected])


def test_batches_refuse_what_is_not_rows(tmp_path):
    make_store(tmp_path / "s.h5")
    with open_store(tmp_path / "s.h5") as st:
        for rows, message in [([23], "row 23 is outside"), ([-24], "row -24 is outside"), ([1.5], "expected a 1-D index"),
                              (np.ones(5, bool), "row mask of shape"), ([[1]], "expected a 1-D index")]:
            with pytest.raises(FeatxError, match=message):
                next(st.batches("avgpool", rows=rows))
        for size in (0, -1, 2.5, True):
            with pytest.raises(FeatxError, match="expected a whole number of rows"):
                next(st.batches("avgpool", size=size))
        with pytest.raises(FeatxError, match="holds avgpool, layer4"):
            next(st.batches("fc"))


def test_split_gives_x_and_y(tmp_path):
    feats = make_store(tmp_path / "s.h5")["avgpool"]
    with open_store(tmp_path / "s.h5") as st:
        x, y = st.split("val", tap="avgpool")
        val = np.arange(23) % 3 == 1
        np.testing.assert_array_equal(x, feats[val])
        np.testing.assert_array_equal(y, np.array([i % 3 for i in range(22)] + [-1])[val])
        with pytest.raises(FeatxError, match="several taps"):
            st.split("train")
        with pytest.raises(FeatxError, match=r"split 'holdout' is not in .*: its rows' splits are test, train, val"):
            st.split("holdout", tap="avgpool")
    make_store(tmp_path / "r.h5", targets=np.arange(23) / 2)
    with open_store(tmp_path / "r.h5") as st:
        assert st.split("test", tap="avgpool")[1].tolist() == (np.arange(2, 23, 3) / 2).tolist()


def test_to_pandas_has_metadata_and_a_column_per_tap(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    feats = make_store(tmp_path / "s.h5", root=str(data), dtype=np.float16)
    with open_store(tmp_path / "s.h5") as st:
        frame = st.to_pandas()
        only = st.to_pandas(taps="avgpool")
        bare = st.to_pandas(taps=[])
    assert list(frame.columns) == ["path", "image_path", "key", "split", "label", "class_name", "avgpool", "layer4"]
    assert list(only.columns)[-1] == "avgpool" and list(bare.columns)[-1] == "class_name"
    assert frame["path"][4] == "c1/4.png" and frame["image_path"][4] == str(data / "c1/4.png")
    assert frame["class_name"][:4].tolist() == ["ants", "bees", "wasps", "ants"]
    assert frame["label"].iloc[-1] == -1 and pd.isna(frame["class_name"].iloc[-1])
    assert frame["avgpool"][7].dtype == np.float32 and frame["layer4"][7].shape == (2, 3, 3)
    np.testing.assert_array_equal(np.stack(frame["avgpool"]), feats["avgpool"].astype(np.float32))


def test_the_default_batch_is_bounded_by_bytes(tmp_path, monkeypatch):
    import featx.store

    make_store(tmp_path / "s.h5")
    monkeypatch.setattr(featx.store, "BATCH_BYTES", 2 * 5 * 4)  # two float32 rows of avgpool
    with open_store(tmp_path / "s.h5") as st:
        assert [len(rows) for rows, _ in st.batches("avgpool")] == [2] * 11 + [1]
        assert {len(rows) for rows, _ in st.batches("layer4")} == {1}  # a row of 18 floats is over the budget alone
